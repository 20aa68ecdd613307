"""The worker's logic (deploy.pipeline, deploy.jobs, deploy.rest) on a fake Orthanc and a fake app."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from deploy import rest
from deploy.jobs import DELIVERED, ERROR, FAILED, QUEUED, RUNNING, STORED, JobStore
from deploy.pipeline import DeliveryPolicy, Node, collect_dicom
from deploy.tests.fakes import FakeApp, FakeOrthanc, dicom_bytes


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def make_node(tmp_path: Path, orthanc: FakeOrthanc, app: FakeApp, clock=None, retries: int = 3,
              destination: str | None = "destination") -> Node:
    clock = clock or Clock()
    policy = DeliveryPolicy(destination, "TPS@127.0.0.1:104" if destination else "", retries, 10, 25)
    return Node(orthanc, JobStore(tmp_path / "jobs", clock=clock), app, tmp_path / "work", policy, clock=clock)


def drain(node: Node, limit: int = 50) -> list[tuple[str, str]]:
    """Run every task that is ready now, as the worker thread would; returns them."""
    done = []
    for _ in range(limit):
        task, _ = node._next()
        if task is None:
            return done
        getattr(node, task[0])(task[1])
        done.append(task)
    raise AssertionError(f"more than {limit} tasks: {done[-5:]}")


def test_ct_study_is_contoured_stored_and_delivered_once(tmp_path):
    orthanc, app = FakeOrthanc(), FakeApp()
    study_uid = generate_uid()
    study = orthanc.add_series("CT", study_uid, 12)
    orthanc.add_series("RTDOSE", study_uid, 1)   # other series of the study are not exported
    node = make_node(tmp_path, orthanc, app)
    node.on_stable_study(study)
    assert node.store.get(study).state == QUEUED
    assert drain(node) == [("contour", study), ("deliver", study)]

    job = node.store.get(study)
    assert job.state == DELIVERED and job.error is None and job.study_uid == study_uid
    assert len(app.runs) == 1 and app.runs[0][3] == 12           # the 12 CT slices only
    assert sorted(r["modality"] for r in job.results) == ["OT", "RTSTRUCT", "SEG"]   # QA series picked up
    assert "qa/sc1.dcm" in [r["file"] for r in job.results] and len(job.results) == 3   # not the staging copy
    assert orthanc.delivered == [[r["orthanc_id"] for r in job.results]]            # one C-STORE, all results
    assert not (app.runs[0][0]).exists(), "the exported CT copy is removed after the run"
    on_disk = json.loads((tmp_path / "jobs" / f"{study}.json").read_text())
    assert on_disk["state"] == DELIVERED and [h["state"] for h in on_disk["history"]] == [
        QUEUED, RUNNING, STORED, DELIVERED]

    # our own results arriving in the study make it stable again: re-checked, not contoured again
    node.on_stable_study(study)
    assert drain(node) == [("recheck", study)]
    assert node.store.get(study).state == DELIVERED and len(app.runs) == 1 and len(orthanc.delivered) == 1

    # a CT series added to the study later: contoured again
    orthanc.add_series("CT", study_uid, 10)
    node.on_stable_study(study)
    assert drain(node) == [("recheck", study), ("contour", study), ("deliver", study)]
    assert len(app.runs) == 2 and app.runs[1][3] == 22 and node.store.get(study).attempt == 2


def test_non_ct_study_is_an_error_without_a_run(tmp_path):
    orthanc, app = FakeOrthanc(), FakeApp()
    study_uid = generate_uid()
    study = orthanc.add_series("MR", study_uid, 5)
    orthanc.add_series("RTDOSE", study_uid, 1)
    node = make_node(tmp_path, orthanc, app)
    node.on_stable_study(study)
    drain(node)
    job = node.store.get(study)
    assert job.state == ERROR and app.runs == [] and orthanc.delivered == []
    assert "has no CT series (series modalities: MR, RTDOSE)" in job.error and study_uid in job.error
    assert "send the planning CT" in job.error
    node.on_stable_study(study)   # the same content again: still one error, still no run
    drain(node)
    assert node.store.get(study).state == ERROR and app.runs == []
    assert [h["state"] for h in node.store.get(study).history].count(ERROR) == 1


@pytest.mark.parametrize("returncode, write, expected", [
    (4, True, "app exit 4 (GeometryError): GeometryError: series S: slice spacing is not uniform - send"),
    (0, False, "the app exited 0 but wrote no DICOM file"),
])
def test_app_failure_is_an_error_and_nothing_is_sent(tmp_path, returncode, write, expected):
    orthanc = FakeOrthanc()
    message = "GeometryError: series S: slice spacing is not uniform - send the complete series" if returncode else ""
    app = FakeApp(returncode=returncode, message=message, write=write)
    study = orthanc.add_series("CT", generate_uid(), 10)
    node = make_node(tmp_path, orthanc, app)
    node.on_stable_study(study)
    drain(node)
    job = node.store.get(study)
    assert job.state == ERROR and expected in job.error and job.results == [] and orthanc.store_calls == 0


def test_destination_down_bounded_retries_then_failed_then_resend(tmp_path):
    orthanc, app, clock = FakeOrthanc(), FakeApp(), Clock()
    study = orthanc.add_series("CT", generate_uid(), 10)
    node = make_node(tmp_path, orthanc, app, clock=clock, retries=4)   # back-off 10, 20, 25 (cap) s
    orthanc.destination_up = False
    node.on_stable_study(study)
    assert drain(node) == [("contour", study), ("deliver", study)]
    waits = []
    for _ in range(3):
        job = node.store.get(study)
        assert job.state == STORED and "C-STORE to TPS@127.0.0.1:104 failed" in job.error
        waits.append(job.next_delivery - clock.t)
        task, sleep = node._next()
        assert task is None and sleep == pytest.approx(waits[-1])   # nothing to do before it is due
        clock.t = job.next_delivery
        assert drain(node) == [("deliver", study)]
    assert waits == [10, 20, 25]
    job = node.store.get(study)
    assert job.state == FAILED and job.delivery_attempts == 4 and orthanc.store_calls == 4
    assert "failed 4 times" in job.error and f"POST /autocontour/jobs/{study}/resend" in job.error
    clock.t += 10_000
    assert drain(node) == []                                 # failed stays failed
    orthanc.destination_up = True
    status, answer = rest.handle(node, "POST", f"/{study}/resend")
    assert status == 200 and answer["state"] == STORED
    assert drain(node) == [("deliver", study)]
    assert node.store.get(study).state == DELIVERED and len(orthanc.delivered) == 1
    assert len(app.runs) == 1


def test_destination_back_during_retries_gets_results_once(tmp_path):
    orthanc, app, clock = FakeOrthanc(), FakeApp(), Clock()
    study = orthanc.add_series("CT", generate_uid(), 10)
    node = make_node(tmp_path, orthanc, app, clock=clock, retries=5)
    orthanc.destination_up = False
    node.on_stable_study(study)
    drain(node)
    orthanc.destination_up = True
    clock.t = node.store.get(study).next_delivery
    assert drain(node) == [("deliver", study)]
    clock.t += 10_000
    assert drain(node) == []
    assert node.store.get(study).state == DELIVERED and len(orthanc.delivered) == 1 and orthanc.store_calls == 2


def test_no_destination_keeps_results_in_orthanc(tmp_path):
    orthanc, app = FakeOrthanc(), FakeApp()
    study = orthanc.add_series("CT", generate_uid(), 10)
    node = make_node(tmp_path, orthanc, app, destination=None)
    node.on_stable_study(study)
    assert drain(node) == [("contour", study)]
    job = node.store.get(study)
    assert job.state == STORED and job.next_delivery is None and len(job.results) == 3 and orthanc.store_calls == 0
    assert rest.handle(node, "POST", f"/{study}/resend")[0] == 409
    # restarted with a destination: the results kept in Orthanc are delivered
    with_dest = make_node(tmp_path, orthanc, app)
    with_dest.resume()
    assert drain(with_dest) == [("deliver", study)]
    assert with_dest.store.get(study).state == DELIVERED and len(orthanc.delivered) == 1 and len(app.runs) == 1


def test_restart_resumes_running_and_unrecorded_studies(tmp_path):
    orthanc, app = FakeOrthanc(), FakeApp()
    study_a = orthanc.add_series("CT", generate_uid(), 10)
    study_b = orthanc.add_series("CT", generate_uid(), 11)   # received, never stable before the stop
    node = make_node(tmp_path, orthanc, app)
    node.on_stable_study(study_a)
    node.store.transition(study_a, RUNNING, "contouring", attempt=1)
    marker = str(tmp_path / "work" / study_a)
    # the run the killed node left behind: its command line names the job's work folder
    orphan = subprocess.Popen(["/bin/sh", "-c", "sleep 60", marker], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        node.store.transition(study_a, RUNNING, "app started", app_pid=orphan.pid)
        restarted = make_node(tmp_path, orthanc, app)      # a new process: records read from disk
        restarted.resume()
        assert orphan.wait(timeout=10) == -9               # ended (SIGKILL to its process group)
        assert bystander.poll() is None                     # an unrelated process is left alone
        assert restarted.store.get(study_a).state == QUEUED
        assert restarted.store.get(study_b).state == QUEUED
        assert "never contoured" in restarted.store.get(study_b).history[0]["message"]
        drain(restarted)
        assert {restarted.store.get(s).state for s in (study_a, study_b)} == {DELIVERED}
        assert len(orthanc.delivered) == 2 and len(app.runs) == 2
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait(timeout=10)


def test_worker_thread_contours_two_studies_one_at_a_time(tmp_path):
    orthanc, app = FakeOrthanc(), FakeApp(seconds=0.3)
    studies = [orthanc.add_series("CT", generate_uid(), 10) for _ in range(2)]
    node = make_node(tmp_path, orthanc, app, clock=time.time)
    node.start()
    try:
        for s in studies:
            node.on_stable_study(s)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and {node.store.get(s).state for s in studies} != {DELIVERED}:
            time.sleep(0.05)
    finally:
        node.stop(timeout_s=10)
    assert {node.store.get(s).state for s in studies} == {DELIVERED}
    (_, s1, e1, _), (_, s2, e2, _) = sorted(app.runs, key=lambda r: r[1])
    assert e1 <= s2, "the two runs overlapped"
    assert len(orthanc.delivered) == 2


def test_rest_routes(tmp_path):
    orthanc, app = FakeOrthanc(), FakeApp()
    uid = generate_uid()
    study = orthanc.add_series("CT", uid, 10)
    bad = orthanc.add_series("MR", generate_uid(), 3)
    node = make_node(tmp_path, orthanc, app)
    for s in (study, bad):
        node.on_stable_study(s)
    drain(node)
    status, answer = rest.handle(node, "GET", None)
    assert status == 200 and answer["destination"] == "TPS@127.0.0.1:104"
    assert answer["counts"] == {DELIVERED: 1, ERROR: 1} and sorted(j["study"] for j in answer["jobs"]) == sorted([study, bad])
    status, answer = rest.handle(node, "GET", f"/{uid}")             # by StudyInstanceUID too
    assert status == 200 and answer["study"] == study and answer["state"] == DELIVERED and answer["history"]
    assert rest.handle(node, "GET", "/nope")[0] == 404
    assert rest.handle(node, "POST", "")[0:2] == (405, {"error": "POST not allowed on /autocontour/jobs - use GET",
                                                       "allow": "GET"})
    assert rest.handle(node, "GET", f"/{study}/resend")[1]["allow"] == "POST"
    status, answer = rest.handle(node, "POST", f"/{bad}/resend")
    assert status == 409 and "has no results to send - POST .../rerun" in answer["error"]
    status, answer = rest.handle(node, "POST", f"/{bad}/rerun")
    assert status == 200 and answer["state"] == QUEUED
    drain(node)
    assert node.store.get(bad).state == ERROR and node.store.get(bad).attempt == 2
    assert rest.handle(node, "POST", f"/{study}/x")[0] == 404


def test_collect_dicom_skips_hidden_folders_and_non_dicom(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / ".staging").mkdir()
    (tmp_path / "a" / "x.dcm").write_bytes(dicom_bytes("SEG", generate_uid(), generate_uid()))
    (tmp_path / ".staging" / "y.dcm").write_bytes(dicom_bytes("SEG", generate_uid(), generate_uid()))
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "short.dcm").write_bytes(b"DICM")
    assert collect_dicom(tmp_path) == [tmp_path / "a" / "x.dcm"]


def test_unreadable_record_is_set_aside(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "abc.json").write_text("{not json")
    store = JobStore(tmp_path / "jobs")
    assert store.all() == [] and (tmp_path / "jobs" / "abc.unreadable").exists()


def test_deploy_modules_need_only_the_standard_library(repo_root=Path(__file__).resolve().parents[2]):
    """Orthanc's embedded Python is Debian's python3 without the project's packages."""
    python = Path("/usr/bin/python3")
    if not python.exists():
        pytest.skip("/usr/bin/python3 not present")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import deploy.settings, deploy.jobs, deploy.pipeline, "
            "deploy.rest, deploy.runner; bad = [m for m in ('numpy', 'pydicom', 'yaml') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([str(python), "-I", "-c", code, str(repo_root)], check=True, timeout=60)


def test_node_stopping_during_a_run_requeues_the_study(tmp_path):
    from deploy.runner import RunStopped

    class StoppedApp(FakeApp):
        def run(self, input_dir, output_dir, log, stop, on_start=None):
            on_start(4242)
            raise RunStopped("stopped after 3 s")

    orthanc = FakeOrthanc()
    study = orthanc.add_series("CT", generate_uid(), 10)
    node = make_node(tmp_path, orthanc, StoppedApp())
    node.on_stable_study(study)
    task, _ = node._next()
    node.contour(study)
    job = node.store.get(study)
    assert job.state == QUEUED and job.app_pid is None and "contoured again at the next start" in job.history[-1]["message"]
    assert not list((tmp_path / "work").rglob("*.dcm")), "the exported CT copy is removed"
