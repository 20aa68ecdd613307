"""Masks of all model branches -> post-processed structures with flags."""

from __future__ import annotations

from operators._ports import PYOBJECT
from monai.deploy.core import Fragment, Operator, OperatorSpec

from autocontour.postprocess import postprocess
from autocontour.run_record import RunRecord
from autocontour.structures import STRUCTURES


class PostprocessOperator(Operator):
    """Merges the branches' masks (in structure-table order) and the External, and applies the table's rules."""

    IN_VOLUME = "volume"
    IN_EXTERNAL = "external"  # the External, computed beside the models (ExternalOperator)
    OUT_STRUCTURES = "structures"

    @staticmethod
    def in_masks(branch: str) -> str:
        """Input port receiving the masks of model branch ``branch``."""
        return f"masks_{branch}"

    def __init__(self, fragment: Fragment, *args, branches: list[str], record: RunRecord, **kwargs):
        self.branches = list(branches)
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_VOLUME)
        spec.input(self.IN_EXTERNAL)
        for b in self.branches:
            spec.input(self.in_masks(b))
        spec.output(self.OUT_STRUCTURES)

    def compute(self, op_input, op_output, context):
        volume = op_input.receive(self.IN_VOLUME)
        external = op_input.receive(self.IN_EXTERNAL)
        masks = {}
        for b in self.branches:
            masks.update(op_input.receive(self.in_masks(b)))
        order = [s.name for s in STRUCTURES if s.name in masks]
        with self.record.stage("postprocess"):
            results = postprocess(volume, {n: masks[n] for n in order}, external=external)
        op_output.emit(results, self.OUT_STRUCTURES, PYOBJECT)
