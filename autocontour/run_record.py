"""What one run did, collected by the operators and written to report.json."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RunRecord"]


@dataclass
class RunRecord:
    """Shared by the operators of one run: stage timings, choices, outputs (staged paths)."""

    input_path: Path
    output_path: Path
    staging_path: Path
    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    staged_files: dict[str, Path] = field(default_factory=dict)  # final name -> staged path
    gpu_monitor: object | None = None  # autocontour.backends.GpuMonitor while a GPU backend runs

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
