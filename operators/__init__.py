"""MONAI Deploy (Holoscan) operators of the auto-contouring app, one per module.

Each operator's ``compute()`` receives, calls a pure function from ``autocontour``, and
emits; port names are class constants shared by ``setup()`` and ``app.py``.
"""

from operators.ct_volume_operator import CTVolumeOperator
from operators.dicom_seg_writer_operator import DicomSegWriterOperator
from operators.external_operator import ExternalOperator
from operators.postprocess_operator import MergeStructuresOperator, PostprocessOperator
from operators.qa_operator import QaOperator
from operators.report_operator import ReportOperator
from operators.rtstruct_writer_operator import RtstructWriterOperator
from operators.segmentation_operator import SegmentationOperator
from operators.series_selector_operator import SeriesSelectorOperator

__all__ = [
    "CTVolumeOperator",
    "DicomSegWriterOperator",
    "ExternalOperator",
    "MergeStructuresOperator",
    "PostprocessOperator",
    "QaOperator",
    "ReportOperator",
    "RtstructWriterOperator",
    "SegmentationOperator",
    "SeriesSelectorOperator",
]
