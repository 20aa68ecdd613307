"""Volume + structures -> QA pictures: PNGs in OUTPUT/qa/ and a Secondary Capture series (staged)."""

from __future__ import annotations

import logging

from monai.deploy.core import Fragment, Operator, OperatorSpec
from pydicom.uid import generate_uid

from autocontour.qa import write_qa
from autocontour.run_record import RunRecord
from operators._ports import PYOBJECT

logger = logging.getLogger(__name__)


class QaOperator(Operator):
    """Beside the writers: renders the QA sheet (``autocontour.qa_render``) and stages it
    as PNG files and as DICOM Secondary Capture images in the CT's study."""

    IN_VOLUME = "volume"
    IN_STRUCTURES = "structures"
    OUT_DONE = "qa_files"
    STAGE = "write_qa"

    def __init__(self, fragment: Fragment, *args, record: RunRecord, algorithm_name: str, algorithm_version: str,
                 series_description: str, **kwargs):
        self.record = record
        self.algorithm_name = algorithm_name
        self.algorithm_version = algorithm_version
        self.series_description = series_description
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_VOLUME)
        spec.input(self.IN_STRUCTURES)
        spec.output(self.OUT_DONE)

    def compute(self, op_input, op_output, context):
        volume = op_input.receive(self.IN_VOLUME)
        results = op_input.receive(self.IN_STRUCTURES)
        with self.record.stage(self.STAGE):
            staged, info = write_qa(
                volume, results, self.record.staging_path, series_instance_uid=generate_uid(),
                algorithm_name=self.algorithm_name, algorithm_version=self.algorithm_version,
                series_description=self.series_description,
            )
        self.record.staged_files.update(staged)
        self.record.qa = info
        op_output.emit(sorted(staged), self.OUT_DONE, PYOBJECT)
