"""Volume + structures -> an RTSTRUCT file (staged until the run succeeds)."""

from __future__ import annotations

from autocontour.rtstruct import build_rtstruct
from autocontour.run_record import OutputFile
from operators._dicom_writer import DicomWriterOperator


class RtstructWriterOperator(DicomWriterOperator):
    """CLOSED_PLANAR contours per CT slice; the SDK has no RTSTRUCT writer."""

    OUT_DONE = "rtstruct_file"
    STAGE = "write_rtstruct"
    SUFFIX = "RTSTRUCT"
    BUILDER = staticmethod(build_rtstruct)

    def record_output(self, output: OutputFile) -> None:
        self.record.rtstruct = output
