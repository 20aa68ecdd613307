"""What one run did, collected by the operators and written to report.json.

Each operator sets its own typed field of the ``RunRecord`` (the series selector
``series``, the CT volume operator ``volume``, the app ``models``, each writer its
``OutputFile``); ``autocontour.report`` reads them back by name.  A new output gets a
field here and a line in ``report.build_report``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from autocontour.gpu import GpuMonitor

__all__ = [
    "CandidateSeries", "ModelUsed", "OutputFile", "QaOutput", "RunRecord", "SecondaryCaptureSeries", "SeriesChoice",
    "VolumeGeometry",
]


@dataclass(frozen=True)
class CandidateSeries:
    """One series found in the input folder, and why it cannot be contoured."""

    series_instance_uid: str
    files: int
    rejected: str  # "" = eligible


@dataclass(frozen=True)
class SeriesChoice:
    """The series contoured, what else was there, and the ranking that chose it."""

    chosen: str  # SeriesInstanceUID
    files: int
    candidates: list[CandidateSeries]
    skipped_files: int  # files that were not readable DICOM
    ranking: list[str]


@dataclass(frozen=True)
class VolumeGeometry:
    """The CT volume's grid: shape, spacing and the index -> LPS affine."""

    shape_kji: list[int]
    spacing_kji_mm: list[float]
    affine: list[list[float]]
    frame_of_reference_uid: str
    study_instance_uid: str


@dataclass(frozen=True)
class ModelUsed:
    """A model that ran, and on which backend."""

    name: str
    version: str
    onnx_sha256: str
    backend: str
    labels: list[str]


@dataclass(frozen=True)
class OutputFile:
    """A DICOM object the run wrote (its file name in OUTPUT and its series)."""

    file: str
    series_instance_uid: str


@dataclass(frozen=True)
class SecondaryCaptureSeries:
    """A Secondary Capture series the run wrote (file names in OUTPUT, one per page)."""

    series_instance_uid: str
    files: list[str]


@dataclass(frozen=True)
class QaOutput:
    """The QA sheet: PNG pages (names in OUTPUT, under qa/) and the same pages as Secondary Capture."""

    png: list[str]
    secondary_capture: SecondaryCaptureSeries


@dataclass
class RunRecord:
    """Shared by the operators of one run: stage timings, choices, outputs (staged paths)."""

    input_path: Path
    output_path: Path
    staging_path: Path
    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    graph_workers: int = 1
    models: list[ModelUsed] = field(default_factory=list)
    series: SeriesChoice | None = None
    volume: VolumeGeometry | None = None
    seg: OutputFile | None = None
    rtstruct: OutputFile | None = None
    qa: QaOutput | None = None  # None with --no-qa
    staged_files: dict[str, Path] = field(default_factory=dict)  # final name -> staged path
    gpu_monitor: GpuMonitor | None = None  # sampling while a GPU backend runs
    committed: bool = False  # the report operator moved the outputs into OUTPUT

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
