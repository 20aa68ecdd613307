"""The two default models: which OpenKBP ROIs become which output channel.

This table is the training-side twin of ``models/<name>/model.yaml``: ``training/export.py``
writes the model.yaml from it, so the app never guesses a label.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from autocontour.model_config import ModelKind
from training.augment import known_slices
from training.data import OPENKBP_ROIS, Case


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "softmax" (mutually exclusive labels + background) or "sigmoid" (independent)
    # output channel -> (TG-263 name, OpenKBP ROIs whose union makes it)
    outputs: tuple[tuple[str, tuple[str, ...]], ...]
    spacing_zyx: tuple[float, float, float] = (3.0, 4.0, 4.0)
    window_hu: tuple[float, float] = (-500.0, 1000.0)
    patch_zyx: tuple[int, int, int] = (64, 80, 80)
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    description: str = ""
    # outputs contoured over a clinician-chosen length: known only between the reference's
    # first and last slice (training/augment.known_slices)
    partial_length: tuple[str, ...] = ()
    # another task whose released model's label map is fed as extra one-hot input channels
    # (training/context.py), e.g. the organ model's output for the target model
    context: str | None = None

    @property
    def context_labels(self) -> int:
        """How many one-hot context channels the network takes beside the CT."""
        return len(TASKS[self.context].outputs) if self.context else 0

    @property
    def in_channels(self) -> int:
        return 1 + self.context_labels

    @property
    def out_channels(self) -> int:
        return ModelKind(self.kind).output_count(len(self.outputs))

    @property
    def mirror_pairs(self) -> tuple[tuple[int, int], ...]:
        """Output index pairs that swap under left-right mirroring (``X_L`` <-> ``X_R``)."""
        names = [n for n, _ in self.outputs]
        return tuple(
            (i, names.index(n[:-2] + "_R")) for i, n in enumerate(names) if n.endswith("_L") and n[:-2] + "_R" in names
        )

    def references(self, case: Case) -> list[np.ndarray | None]:
        """Each output's reference mask for ``case`` (``reference_mask``), None where unknown."""
        return [reference_mask(rois, case) for _, rois in self.outputs]

    def targets(self, case: Case, refs: list[np.ndarray | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(target array, known flag per output) for one case.

        softmax: uint8 label map (0 = background); sigmoid: uint8 (n_out, z, y, x) of 0/1
        (small in memory: the trainer holds 160 patients and casts each batch).
        Each output follows ``reference_mask``: known when its first ROI was contoured.
        """
        refs = self.references(case) if refs is None else refs
        known = np.array([r is not None for r in refs])
        if self.kind == "softmax":
            lab = np.zeros(case.ct.shape, np.uint8)
            for ch, ref in enumerate(refs, start=1):
                if ref is not None:
                    lab[ref] = ch
            return lab, known
        tgt = np.stack([r if r is not None else np.zeros(case.ct.shape, bool) for r in refs])
        return tgt.astype(np.uint8), known

    def known_slices(self, case: Case, refs: list[np.ndarray | None] | None = None) -> np.ndarray:
        """(n_out, z) bool: on which slices each output's reference is valid (see augment.known_slices)."""
        refs = self.references(case) if refs is None else refs
        return known_slices(
            np.array([r is not None for r in refs]), refs, tuple(n in self.partial_length for n, _ in self.outputs)
        )


def reference_mask(rois: tuple[str, ...], case: Case) -> np.ndarray | None:
    """The reference of an output made of ``rois``, or None when it is unknown for ``case``.

    The first ROI defines the output: when it was not contoured the output is unknown.  The
    reference is the union of the listed ROIs that were contoured; OpenKBP stores the dose
    levels as disjoint shells, so the nested clinical volumes are unions (``PTV_Mid`` =
    PTV63 + PTV70), and a patient without a PTV63 has no intermediate level to learn from.
    """
    idx = {n: i for i, n in enumerate(OPENKBP_ROIS)}
    if not case.present[idx[rois[0]]]:
        return None
    return np.any([case.masks[idx[r]] for r in rois if case.present[idx[r]]], axis=0)


TASKS = {
    "hn_oar": Task(
        name="hn_oar",
        kind="softmax",
        outputs=(
            ("Brainstem", ("Brainstem",)),
            ("SpinalCord", ("SpinalCord",)),
            ("Parotid_L", ("LeftParotid",)),
            ("Parotid_R", ("RightParotid",)),
            ("Esophagus", ("Esophagus",)),
            ("Larynx", ("Larynx",)),
            ("Bone_Mandible", ("Mandible",)),
        ),
        description="Head-and-neck organs at risk (mutually exclusive labels)",
        partial_length=("Brainstem", "SpinalCord", "Esophagus"),
    ),
    "hn_target": Task(
        name="hn_target",
        kind="sigmoid",
        outputs=(
            ("PTV_High", ("PTV70",)),
            ("PTV_Mid", ("PTV63", "PTV70")),
            ("PTV_Low", ("PTV56", "PTV63", "PTV70")),
        ),
        description="Planning target volumes at three nested dose levels (PTV_High = PTV70, PTV_Mid = PTV63 + PTV70, "
        "PTV_Low = PTV56 + PTV63 + PTV70)",
    ),
}
# The same targets with the organ model's label map as 7 extra input channels (experiment:
# does knowing the organs help place the target?)
TASKS["hn_target_ctx"] = replace(
    TASKS["hn_target"], name="hn_target_ctx", context="hn_oar",
    description=TASKS["hn_target"].description + "; input: CT and the hn_oar model's organ labels",
)
