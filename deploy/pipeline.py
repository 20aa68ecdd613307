"""The node's worker: a stable study in Orthanc -> the app -> results in Orthanc -> C-STORE.

One worker thread does everything, one study at a time (two cores: the app uses both), in
this order of priority: deliveries that are due, then studies waiting to be contoured, then
re-checks of finished studies that received new instances.  Orthanc is reached only through
an ``OrthancApi`` (its REST API in-process, from ``deploy/orthanc/plugin.py``; a fake in the
tests), the app only through an ``AppRunner``, and every step is recorded in the ``JobStore``
before the next one starts, so a node stopped or killed at any point resumes where it was:

- ``on_stable_study`` (Orthanc's STABLE_STUDY) writes a ``queued`` record at once; the callback
  returns without waiting for anything.
- ``contour``: the study's CT series are exported (no CT series: ``error``, no run), the app runs,
  every DICOM file it writes (SEG, RTSTRUCT and any other, e.g. a QA series) is stored into
  Orthanc, the job becomes ``stored``.
- ``deliver``: one synchronous C-STORE of all results to the destination
  (``/modalities/destination/store``); a failure is retried after RETRY_S, 2 x RETRY_S, ...
  (at most RETRY_MAX_S), RETRIES attempts in all, then the job is ``failed`` until an operator
  re-sends it.
- ``start`` (ORTHANC_STARTED) re-queues a run the previous process left ``running`` (ending that
  run if it outlived the node) and queues studies Orthanc holds that have no record.

Standard library only (imported inside Orthanc's Python).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from deploy.jobs import DELIVERED, ERROR, FAILED, QUEUED, RUNNING, STORED, TERMINAL, Job, JobStore
from deploy.runner import AppRunner, RunStopped, end_stale_run

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """Orthanc answered a REST call with an error (the message is Orthanc's)."""


class OrthancApi(Protocol):
    """The part of Orthanc's REST API the worker uses."""

    def get_json(self, uri: str) -> Any: ...

    def get_bytes(self, uri: str) -> bytes: ...

    def post_json(self, uri: str, body: Any) -> Any: ...

    def post_dicom(self, data: bytes) -> dict[str, Any]: ...


class Conflict(Exception):
    """A REST request that does not fit the job's state (HTTP 409); the message says why."""


@dataclass(frozen=True)
class DeliveryPolicy:
    destination: str | None          # Orthanc's symbolic modality name, None: keep results in Orthanc
    address: str = ""                # AET@host:port, for messages
    retries: int = 8                 # C-STORE attempts before ``failed``
    retry_s: float = 30.0
    retry_max_s: float = 600.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt: RETRY_S doubled each time, capped."""
        return min(self.retry_s * 2 ** max(failures - 1, 0), self.retry_max_s)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then ``DICM``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def collect_dicom(output: Path) -> list[Path]:
    """Every DICOM file the app wrote under ``output`` (recursively; hidden folders, such as a
    staging folder left by a killed run, are skipped), sorted by path."""
    found = []
    for path in sorted(output.rglob("*")):
        rel = path.relative_to(output)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if is_dicom_file(path):
            found.append(path)
    return found


def fingerprint(ct_series: list[dict[str, Any]]) -> list[str]:
    """What was contoured: each CT series' UID and instance count, sorted."""
    return sorted(f"{s['uid']}:{len(s['instances'])}" for s in ct_series)


class Node:
    """The worker and the operations the REST API offers; see the module docstring."""

    def __init__(self, api: OrthancApi, store: JobStore, runner: AppRunner, work_dir: Path,
                 policy: DeliveryPolicy, clock=time.time) -> None:
        self.api = api
        self.store = store
        self.runner = runner
        self.work_dir = Path(work_dir)
        self.policy = policy
        self.clock = clock
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self.busy: str | None = None  # the study being worked on

    # ---- called from Orthanc's callbacks: quick, never blocking on the worker ----

    def on_stable_study(self, study: str) -> None:
        """STABLE_STUDY: a new study is queued; a known one is marked for a re-check."""
        with self.store.lock:
            if self.store.get(study) is None:
                self.store.create(study)
                logger.info("study %s is stable: queued", study)
            else:
                with self.store.update(study) as job:
                    job.recheck = True
        self.notify()

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def start(self) -> None:
        """Resume what the previous process left, then start the worker thread."""
        self.resume()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="autocontour-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the worker (a running app is ended; its study is contoured again at the next start)."""
        self._stop.set()
        self.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("the worker did not stop within %.0f s", timeout_s)

    def resume(self) -> None:
        for job in self.store.all():
            if job.state == RUNNING:
                if end_stale_run(job.app_pid, str(self.work_dir / job.study)):
                    logger.warning("study %s: ended the run (pid %s) the previous node process left", job.study,
                                   job.app_pid)
                self.store.transition(job.study, QUEUED, "the node stopped during the run: contoured again",
                                      app_pid=None)
                logger.warning("study %s: the node stopped during its run: queued again", job.study)
            elif job.state == STORED and job.next_delivery is None and self.policy.destination:
                # stored while no destination was configured: deliver now that there is one
                self.store.transition(job.study, STORED, f"destination {self.policy.address} configured: delivering",
                                      next_delivery=self.clock())
        try:
            studies = self.api.get_json("/studies")
        except ApiError as exc:
            logger.error("cannot list the studies in Orthanc: %s", exc)
            return
        for study in studies:
            if self.store.get(study) is None:
                self.store.create(study, "received before the node stopped, never contoured")
                logger.warning("study %s was received before the node stopped and never contoured: queued", study)

    # ---- REST operations ----

    def find(self, key: str) -> Job | None:
        """A job by Orthanc's study id or by StudyInstanceUID."""
        job = self.store.get(key)
        if job is None:
            job = next((j for j in self.store.all() if j.study_uid == key), None)
        return job

    def resend(self, key: str) -> Job:
        """Deliver a job's results again (a ``failed`` one, or a ``delivered`` one once more)."""
        job = self.find(key)
        if job is None:
            raise KeyError(key)
        if self.policy.destination is None:
            raise Conflict("no destination is configured (AUTOCONTOUR_NODE_DEST) - set it and restart the node")
        if job.state not in (FAILED, DELIVERED, STORED) or not job.results:
            raise Conflict(f"study {job.study} is {job.state} and has no results to send"
                           + (" - POST .../rerun to contour it again" if job.state == ERROR else ""))
        job = self.store.transition(job.study, STORED, f"re-send to {self.policy.address} requested",
                                    delivery_attempts=0, next_delivery=self.clock(), error=None)
        self.notify()
        return job

    def rerun(self, key: str) -> Job:
        """Contour a finished study again (e.g. after an ``error`` that has been fixed)."""
        job = self.find(key)
        if job is None:
            raise KeyError(key)
        if job.state not in TERMINAL:
            raise Conflict(f"study {job.study} is {job.state}: wait until it is delivered, failed or error")
        job = self.store.transition(job.study, QUEUED, "re-run requested", error=None)
        self.notify()
        return job

    # ---- the worker ----

    def _loop(self) -> None:
        logger.info("worker started (destination %s)", self.policy.address or "none")
        while not self._stop.is_set():
            task, wait = self._next()
            if task is None:
                with self._wake:
                    if not self._stop.is_set():
                        self._wake.wait(timeout=wait)
                continue
            kind, study = task
            self.busy = study
            try:
                getattr(self, kind)(study)
            except Exception as exc:  # noqa: BLE001 - one bad study must not stop the node
                logger.exception("study %s: unexpected failure in %s", study, kind)
                job = self.store.get(study)
                if job is not None and job.state in (QUEUED, RUNNING):
                    self._error(study, f"{kind} failed: {type(exc).__name__}: {exc} (traceback in the node's log)")
            finally:
                self.busy = None
        logger.info("worker stopped")

    def _next(self) -> tuple[tuple[str, str] | None, float]:
        """The next task, or None and how long to sleep."""
        now = self.clock()
        jobs = self.store.all()
        due = [j for j in jobs if j.state == STORED and j.next_delivery is not None and self.policy.destination]
        ready = [j for j in due if j.next_delivery <= now]
        if ready:
            return ("deliver", min(ready, key=lambda j: j.next_delivery).study), 0.0
        for j in jobs:
            if j.state == QUEUED:
                return ("contour", j.study), 0.0
        for j in jobs:
            if j.recheck and j.state in TERMINAL:
                return ("recheck", j.study), 0.0
        wait = min((j.next_delivery - now for j in due), default=60.0)
        return None, max(0.05, min(wait, 60.0))

    def inspect(self, study: str) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
        """Orthanc's study record, its CT series ({id, uid, instances}) and the other series' modalities."""
        info = self.api.get_json(f"/studies/{study}")
        ct, other = [], []
        for series in self.api.get_json(f"/studies/{study}/series"):
            tags = series.get("MainDicomTags", {})
            modality = tags.get("Modality", "")
            if modality == "CT":
                ct.append({"id": series["ID"], "uid": tags.get("SeriesInstanceUID", ""),
                           "description": tags.get("SeriesDescription", ""), "instances": list(series["Instances"])})
            else:
                other.append(modality or "?")
        return info, ct, other

    def recheck(self, study: str) -> None:
        """New instances in a finished study: contour again only if its CT series changed."""
        with self.store.update(study) as job:
            job.recheck = False
        try:
            _, ct, _ = self.inspect(study)
        except ApiError as exc:
            logger.warning("study %s: cannot re-check it (%s)", study, exc)
            return
        job = self.store.get(study)
        if fingerprint(ct) == job.fingerprint:
            logger.info("study %s: no new CT instance since it was contoured (%s): nothing to do", study, job.state)
            return
        self.store.transition(study, QUEUED, "new CT instances arrived: contoured again")
        logger.info("study %s: new CT instances since it was contoured: queued again", study)

    def contour(self, study: str) -> None:
        job = self.store.transition(study, RUNNING, "contouring", attempt=self.store.get(study).attempt + 1,
                                    recheck=False, results=[], error=None, delivery_attempts=0,
                                    next_delivery=None, app_pid=None)
        try:
            info, ct, other = self.inspect(study)
        except ApiError as exc:
            self._error(study, f"cannot read the study from Orthanc: {exc}")
            return
        reason = self.runner.check()
        if reason:
            self._error(study, f"cannot run the app: {reason}")
            return
        tags = info.get("MainDicomTags", {})
        study_uid = tags.get("StudyInstanceUID", "")
        with self.store.update(study) as job:
            job.study_uid = study_uid
            job.patient_id = info.get("PatientMainDicomTags", {}).get("PatientID", "")
            job.fingerprint = fingerprint(ct)
            job.ct_series = [{"uid": s["uid"], "description": s["description"], "instances": len(s["instances"])}
                             for s in ct]
        if not ct:
            kinds = ", ".join(sorted(set(other))) or "none"
            self._error(study, f"study {study_uid or study} has no CT series (series modalities: {kinds}): not "
                               "contoured - send the planning CT series to this node")
            return

        run_dir = self.work_dir / study / f"run-{job.attempt}"
        for old in (self.work_dir / study).glob("run-*"):
            shutil.rmtree(old, ignore_errors=True)
        input_dir, output_dir = run_dir / "ct", run_dir / "out"
        input_dir.mkdir(parents=True)
        n = 0
        for series in ct:
            for instance in series["instances"]:
                (input_dir / f"{instance}.dcm").write_bytes(self.api.get_bytes(f"/instances/{instance}/file"))
                n += 1
        logger.info("study %s: %d CT instances of %d series exported; running the app (%s)", study, n, len(ct),
                    self.runner.name)

        def record_pid(pid: int) -> None:
            with self.store.update(study) as j:
                j.app_pid = pid

        try:
            result = self.runner.run(input_dir, output_dir, run_dir / "app.log", self._stop, on_start=record_pid)
        except RunStopped as exc:
            self.store.transition(study, QUEUED, f"the node is stopping: run {exc}; contoured again at the next start",
                                  app_pid=None)
            logger.warning("study %s: the node is stopping, run ended; it is contoured again at the next start", study)
            return
        finally:
            shutil.rmtree(input_dir, ignore_errors=True)
        if not result.ok:
            self._error(study, f"study {study_uid}: {result.describe()}")
            return
        files = collect_dicom(output_dir)
        if not files:
            self._error(study, f"study {study_uid}: the app exited 0 but wrote no DICOM file into {output_dir}")
            return
        results = []
        for path in files:
            answer = self.api.post_dicom(path.read_bytes())
            modality = ""
            if answer.get("ParentSeries"):
                modality = self.api.get_json(f"/series/{answer['ParentSeries']}").get("MainDicomTags", {}).get(
                    "Modality", "")
            results.append({"file": str(path.relative_to(output_dir)), "orthanc_id": answer["ID"],
                            "status": answer.get("Status", ""), "modality": modality})
        kinds = ", ".join(r["modality"] or r["file"] for r in results)
        next_delivery = self.clock() if self.policy.destination else None
        self.store.transition(study, STORED, f"app {result.seconds:.1f} s; stored into Orthanc: {kinds}",
                              results=results, next_delivery=next_delivery, app_pid=None)
        logger.info("study %s: contoured in %.1f s; %s stored into Orthanc%s", study, result.seconds, kinds,
                    "" if self.policy.destination else " (no destination configured: nothing is sent)")

    def deliver(self, study: str) -> None:
        job = self.store.get(study)
        ids = [r["orthanc_id"] for r in job.results]
        attempt = job.delivery_attempts + 1
        address = self.policy.address
        try:
            self.api.post_json(f"/modalities/{self.policy.destination}/store",
                               {"Resources": ids, "Synchronous": True})
        except Exception as exc:  # noqa: BLE001 - whatever the reason, this attempt failed
            if attempt >= self.policy.retries:
                message = (f"C-STORE to {address} failed {attempt} times (last: {exc}) - check the destination, "
                           f"then POST /autocontour/jobs/{study}/resend")
                self.store.transition(study, FAILED, message, delivery_attempts=attempt, next_delivery=None,
                                      error=message)
                logger.error("study %s: %s", study, message)
            else:
                wait = self.policy.backoff(attempt)
                message = f"C-STORE to {address} failed ({exc}); attempt {attempt + 1}/{self.policy.retries} in {wait:.0f} s"
                self.store.transition(study, STORED, message, delivery_attempts=attempt,
                                      next_delivery=self.clock() + wait, error=message)
                logger.warning("study %s: %s", study, message)
            return
        self.store.transition(study, DELIVERED, f"C-STORE of {len(ids)} instances to {address} succeeded",
                              delivery_attempts=attempt, next_delivery=None, error=None)
        logger.info("study %s: %d results delivered to %s", study, len(ids), address)

    def _error(self, study: str, message: str) -> None:
        self.store.transition(study, ERROR, message, error=message, app_pid=None)
        logger.error("study %s: %s", study, message)
