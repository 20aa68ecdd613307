"""Domain errors, each with the process exit code the app returns for it.

Tree::

    AutoContourError (exit 1: unexpected internal failure)
    +-- InputError            (exit 2)  input folder missing/empty, no readable DICOM
    +-- SeriesSelectionError  (exit 3)  no CT series fit to contour
    +-- GeometryError         (exit 4)  slices missing, uneven, tilted, duplicated, mixed
    +-- ModelError            (exit 5)  model file missing/corrupt, checksum mismatch, no backend
    +-- OutputError           (exit 6)  output folder missing/read-only, write failed
    +-- InferenceError        (exit 7)  the backend failed while running a model
    +-- ConfigurationError    (exit 8)  a configuration file (config/series_selection.yaml) is missing or malformed

Every message names the file or series at fault and what to do about it, on one line.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AutoContourError",
    "ConfigurationError",
    "GeometryError",
    "InferenceError",
    "InputError",
    "ModelError",
    "OutputError",
    "SeriesSelectionError",
    "EXIT_CODES",
]


class AutoContourError(Exception):
    """Base of all errors the app reports to its caller."""

    exit_code: ClassVar[int] = 1


class InputError(AutoContourError):
    exit_code: ClassVar[int] = 2


class SeriesSelectionError(AutoContourError):
    exit_code: ClassVar[int] = 3


class GeometryError(AutoContourError):
    exit_code: ClassVar[int] = 4


class ModelError(AutoContourError):
    exit_code: ClassVar[int] = 5


class OutputError(AutoContourError):
    exit_code: ClassVar[int] = 6


class InferenceError(AutoContourError):
    exit_code: ClassVar[int] = 7


class ConfigurationError(AutoContourError):
    exit_code: ClassVar[int] = 8


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        AutoContourError, InputError, SeriesSelectionError, GeometryError, ModelError, OutputError, InferenceError,
        ConfigurationError,
    )
}
