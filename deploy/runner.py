"""Run the app on one exported study: ``.venv/bin/python app.py -i IN -o OUT`` or the MAP image.

The app runs as a child process in its own process group (so that stopping the node stops the
whole run), its stdout and stderr go to a log file beside the output, and its exit code is the
one documented in docs/errors.md.  Standard library only (imported inside Orthanc's Python).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# docs/errors.md: the app's exit codes
EXIT_CODES = {
    0: "contours written",
    1: "internal error",
    2: "InputError",
    3: "SeriesSelectionError",
    4: "GeometryError",
    5: "ModelError",
    6: "OutputError",
    7: "InferenceError",
}
APP_ERROR_MARK = "ERROR hn-autocontour:"  # the app's one-line verdict on stderr (docs/errors.md)


class RunStopped(Exception):
    """The node is stopping: the run was ended and will be repeated at the next start."""


@dataclass
class RunResult:
    returncode: int
    seconds: float
    log: Path
    message: str  # the app's verdict line when it failed, else ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """One line for the job record: exit code, its meaning, the app's own message."""
        meaning = EXIT_CODES.get(self.returncode, "killed or unknown exit code")
        text = f"app exit {self.returncode} ({meaning})"
        return f"{text}: {self.message}" if self.message else f"{text}; log {self.log}"


def verdict(log: Path) -> str:
    """The app's last ``ERROR hn-autocontour:`` line (without the time stamp), or ''."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if APP_ERROR_MARK in line:
            return line.split(APP_ERROR_MARK, 1)[1].strip()
    return ""


class AppRunner:
    """Runs a command per study; ``command(in, out)`` is what differs between the venv and the MAP."""

    name = "app"

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def command(self, input_dir: Path, output_dir: Path) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def check(self) -> str | None:
        """Why this runner cannot run here (a one-line reason), or None."""
        return None

    def run(self, input_dir: Path, output_dir: Path, log: Path, stop: threading.Event,
            on_start=None) -> RunResult:
        """Run once; RunStopped if ``stop`` is set meanwhile (the process group is ended first)."""
        cmd, env = self.command(input_dir, output_dir)
        t0 = time.monotonic()
        with open(log, "ab") as fh:
            fh.write(f"$ {' '.join(cmd)}\n".encode())
            fh.flush()
            with self._lock:
                self._proc = proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                     env=env, cwd=str(output_dir.parent), start_new_session=True)
        if on_start is not None:
            on_start(proc.pid)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if stop.is_set():
                    end_process_group(proc)
                    raise RunStopped(f"stopped after {time.monotonic() - t0:.0f} s")
                if time.monotonic() - t0 > self.timeout_s:
                    end_process_group(proc)
                    return RunResult(-1, time.monotonic() - t0, log,
                                     f"the run took longer than {self.timeout_s:.0f} s and was stopped "
                                     "- raise AUTOCONTOUR_NODE_APP_TIMEOUT_S or check the machine's load")
        finally:
            with self._lock:
                self._proc = None
        return RunResult(rc, time.monotonic() - t0, log, "" if rc == 0 else verdict(log))


def end_process_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace_s``.  The grace is short on
    purpose: Holoscan catches SIGTERM and lets the graph finish (seen: a run 3 s in went on for
    8 s more), and a stopped run is repeated anyway; the app's staging folder makes a killed run
    leave no result (docs/errors.md)."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def end_stale_run(pid: int | None, marker: str) -> bool:
    """After a crash: SIGKILL the process group of a run left behind by the previous node
    process, if ``pid`` is still alive and its command line contains ``marker`` (the job's work
    folder: a recycled pid is never touched).  True when one was ended."""
    if not pid:
        return False
    try:  # the venv run has the work folder on its command line, the MAP run in MAP_INPUT
        proc_text = b" ".join(Path(f"/proc/{pid}/{name}").read_bytes() for name in ("cmdline", "environ"))
    except OSError:
        return False
    if marker not in proc_text.replace(b"\0", b" ").decode(errors="replace"):
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    for _ in range(50):  # bounded: 5 s
        if not Path(f"/proc/{pid}").exists():
            break
        try:  # our orphan's parent is gone, so it may be a zombie of init: stop waiting once it is
            if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                break
        except (OSError, IndexError):
            break
        time.sleep(0.1)
    return True


class VenvRunner(AppRunner):
    """``<root>/.venv/bin/python <root>/app.py -i IN -o OUT`` (the 32 MiB stack Holoscan asks for)."""

    name = "venv"

    def __init__(self, root: Path, timeout_s: float, python: Path | None = None) -> None:
        super().__init__(timeout_s)
        self.root = Path(root)
        self.python = Path(python) if python else self.root / ".venv" / "bin" / "python"

    def check(self) -> str | None:
        if not os.access(self.python, os.X_OK):
            return f"{self.python} not found - run 'make venv' in {self.root} first"
        return None

    def command(self, input_dir: Path, output_dir: Path) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        cmd = ["/bin/sh", "-c", 'ulimit -s 32768 2>/dev/null; exec "$@"', "app",
               str(self.python), str(self.root / "app.py"), "-i", str(input_dir), "-o", str(output_dir)]
        return cmd, env


class MapRunner(AppRunner):
    """The MAP image through ``packaging/podman.sh run`` (docs/packaging.md)."""

    name = "map"

    def __init__(self, root: Path, timeout_s: float, image: str) -> None:
        super().__init__(timeout_s)
        self.root = Path(root)
        self.image = image

    def check(self) -> str | None:
        if shutil.which("podman") is None:
            return "podman is not installed - run 'make map-image' first, or use AUTOCONTOUR_NODE_RUNNER=venv"
        return None

    def command(self, input_dir: Path, output_dir: Path) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, MAP_IMAGE=self.image, MAP_INPUT=str(input_dir), MAP_OUTPUT=str(output_dir))
        return ["bash", str(self.root / "packaging" / "podman.sh"), "run"], env
