"""Post-processing: one operator per model branch, then one that merges the branches.

Each model's structures are post-processed as soon as that model is done (beside the models
still running), so only the slowest model's structures are left on the critical path.
"""

from __future__ import annotations

from operators._ports import PYOBJECT
from monai.deploy.core import Fragment, Operator, OperatorSpec

from autocontour.postprocess import merge_structures, postprocess_masks
from autocontour.run_record import RunRecord


class PostprocessOperator(Operator):
    """One model branch's masks + the External -> that model's post-processed structures."""

    IN_VOLUME = "volume"
    IN_EXTERNAL = "external"  # the External, computed beside the models (ExternalOperator)
    IN_MASKS = "masks"
    OUT_STRUCTURES = "structures"

    def __init__(self, fragment: Fragment, *args, branch: str, record: RunRecord, **kwargs):
        self.branch = branch
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_VOLUME)
        spec.input(self.IN_EXTERNAL)
        spec.input(self.IN_MASKS)
        spec.output(self.OUT_STRUCTURES)

    def compute(self, op_input, op_output, context):
        volume = op_input.receive(self.IN_VOLUME)
        external = op_input.receive(self.IN_EXTERNAL)
        masks = op_input.receive(self.IN_MASKS)
        with self.record.stage(f"postprocess_{self.branch}"):
            results = postprocess_masks(volume, masks, external)
        op_output.emit(results, self.OUT_STRUCTURES, PYOBJECT)


class MergeStructuresOperator(Operator):
    """The External + every branch's structures -> one structure set (table order, nested levels, flags)."""

    IN_VOLUME = "volume"
    IN_EXTERNAL = "external"
    OUT_STRUCTURES = "structures"

    @staticmethod
    def in_structures(branch: str) -> str:
        """Input port receiving the post-processed structures of model branch ``branch``."""
        return f"structures_{branch}"

    def __init__(self, fragment: Fragment, *args, branches: list[str], record: RunRecord, **kwargs):
        self.branches = list(branches)
        self.record = record
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.IN_VOLUME)
        spec.input(self.IN_EXTERNAL)
        for b in self.branches:
            spec.input(self.in_structures(b))
        spec.output(self.OUT_STRUCTURES)

    def compute(self, op_input, op_output, context):
        volume = op_input.receive(self.IN_VOLUME)
        external = op_input.receive(self.IN_EXTERNAL)
        parts = [op_input.receive(self.in_structures(b)) for b in self.branches]
        with self.record.stage("postprocess"):
            results = merge_structures(volume, external, parts)
        op_output.emit(results, self.OUT_STRUCTURES, PYOBJECT)
