"""Volume + structures -> a DICOM-SEG file (staged until the run succeeds)."""

from __future__ import annotations

from autocontour.dicom_seg import build_seg
from autocontour.run_record import OutputFile
from operators._dicom_writer import DicomWriterOperator


class DicomSegWriterOperator(DicomWriterOperator):
    """One BINARY segment per structure, SNOMED codes and colours from the structure table."""

    OUT_DONE = "seg_file"
    STAGE = "write_seg"
    SUFFIX = "SEG"
    BUILDER = staticmethod(build_seg)

    def record_output(self, output: OutputFile) -> None:
        self.record.seg = output
