"""Volume -> boolean masks of one model's structures (one graph branch per model)."""

from __future__ import annotations

from operators._ports import PYOBJECT
from monai.deploy.core import Fragment, Operator, OperatorSpec

from autocontour.backends import Backend
from autocontour.inference import segment
from autocontour.model_config import ModelConfig
from autocontour.run_record import RunRecord


class SegmentationOperator(Operator):
    """Runs a model loaded once at start-up (``backend``) on each volume it receives."""

    IN_VOLUME = "volume"
    OUT_MASKS = "masks"

    def __init__(self, fragment: Fragment, *args, model: ModelConfig, backend: Backend, record: RunRecord, **kwargs):
        self.model = model
        self.backend = backend
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_VOLUME)
        spec.output(self.OUT_MASKS)

    def compute(self, op_input, op_output, context):
        volume = op_input.receive(self.IN_VOLUME)
        with self.record.stage(f"inference_{self.model.name}"):
            masks = segment(volume, self.model, self.backend)
        op_output.emit(masks, self.OUT_MASKS, PYOBJECT)
