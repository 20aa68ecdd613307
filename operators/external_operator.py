"""Volume -> the External (body contour), beside the model branches: it needs the CT alone."""

from __future__ import annotations

from operators._ports import PYOBJECT
from monai.deploy.core import Fragment, Operator, OperatorSpec

from autocontour.postprocess import external_structure
from autocontour.run_record import RunRecord


class ExternalOperator(Operator):
    """Thresholds, morphology and components on the CT (``autocontour.external``); no model."""

    IN_VOLUME = "volume"
    OUT_EXTERNAL = "external"

    def __init__(self, fragment: Fragment, *args, record: RunRecord, **kwargs):
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_VOLUME)
        spec.output(self.OUT_EXTERNAL)

    def compute(self, op_input, op_output, context):
        volume = op_input.receive(self.IN_VOLUME)
        with self.record.stage("external"):
            external = external_structure(volume)
        op_output.emit(external, self.OUT_EXTERNAL, PYOBJECT)
