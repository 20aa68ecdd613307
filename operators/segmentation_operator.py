"""Volume -> boolean masks of one model's structures (one graph branch per model)."""

from __future__ import annotations

from operators._ports import PYOBJECT
from monai.deploy.core import Fragment, Operator, OperatorSpec

from autocontour.run_record import RunRecord
from autocontour.segmenter import Segmenter


class SegmentationOperator(Operator):
    """Runs a model opened once at start-up (``segmenter``) on each volume it receives."""

    IN_VOLUME = "volume"
    OUT_MASKS = "masks"

    def __init__(self, fragment: Fragment, *args, segmenter: Segmenter, record: RunRecord, **kwargs):
        self.segmenter = segmenter
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_VOLUME)
        spec.output(self.OUT_MASKS)

    def compute(self, op_input, op_output, context):
        volume = op_input.receive(self.IN_VOLUME)
        with self.record.stage(f"inference_{self.segmenter.name}"):
            masks = self.segmenter.predict(volume)
        op_output.emit(masks, self.OUT_MASKS, PYOBJECT)
