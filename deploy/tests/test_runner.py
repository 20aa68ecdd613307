"""Running the app as a child process: exit codes, the app's verdict, timeout, stop."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from deploy.runner import MapRunner, RunStopped, VenvRunner, verdict

FAKE_APP = '''
import os, sys, time
args = sys.argv[1:]
out = args[args.index("-o") + 1]
mode = open(os.path.join(args[args.index("-i") + 1], "mode")).read().strip()
if mode == "fail":
    print("2026-01-01 00:00:00,000 ERROR hn-autocontour: GeometryError: series S: missing slice - send the complete series", file=sys.stderr)
    sys.exit(4)
if mode == "sleep":
    open(os.path.join(out, "pid"), "w").write(str(os.getpid()))
    time.sleep(60)
'''


@pytest.fixture
def fake_root(tmp_path):
    (tmp_path / "app.py").write_text(FAKE_APP)
    return tmp_path


def _dirs(tmp_path: Path, mode: str) -> tuple[Path, Path]:
    i, o = tmp_path / "run" / "ct", tmp_path / "run" / "out"
    i.mkdir(parents=True)
    o.mkdir()
    (i / "mode").write_text(mode)
    return i, o


def test_exit_code_and_verdict(fake_root, tmp_path):
    import sys

    runner = VenvRunner(fake_root, timeout_s=60, python=Path(sys.executable))
    i, o = _dirs(tmp_path, "fail")
    pids = []
    result = runner.run(i, o, tmp_path / "app.log", threading.Event(), on_start=pids.append)
    assert result.returncode == 4 and not result.ok and pids
    assert result.describe() == ("app exit 4 (GeometryError): GeometryError: series S: missing slice - send the "
                                 "complete series")
    assert verdict(tmp_path / "app.log") == result.message


def test_timeout_and_stop_end_the_whole_process_group(fake_root, tmp_path):
    import sys

    runner = VenvRunner(fake_root, timeout_s=10, python=Path(sys.executable))
    i, o = _dirs(tmp_path, "sleep")
    stop = threading.Event()
    threading.Timer(2.0, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(RunStopped):
        runner.run(i, o, tmp_path / "app.log", stop)
    assert time.monotonic() - t0 < 9
    pid = int((o / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
    runner.timeout_s = 1.5
    (o / "pid").unlink()
    result = runner.run(i, o, tmp_path / "app2.log", threading.Event())
    assert result.returncode == -1 and "longer than 2 s" in result.describe()


def test_runner_checks(tmp_path, monkeypatch):
    assert "run 'make venv'" in VenvRunner(tmp_path, 60).check()
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "podman is not installed" in MapRunner(tmp_path, 60, "img").check()
    cmd, env = MapRunner(tmp_path, 60, "localhost/x:1-cpu").command(tmp_path / "in", tmp_path / "out")
    assert cmd == ["bash", str(tmp_path / "packaging" / "podman.sh"), "run"]
    assert (env["MAP_IMAGE"], env["MAP_INPUT"], env["MAP_OUTPUT"]) == (
        "localhost/x:1-cpu", str(tmp_path / "in"), str(tmp_path / "out"))
    assert os.environ.get("MAP_IMAGE") != "localhost/x:1-cpu"
