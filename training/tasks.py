"""The two default models: which OpenKBP ROIs become which output channel.

This table is the training-side twin of ``models/<name>/model.yaml``: ``training/export.py``
writes the model.yaml from it, so the app never guesses a label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

    @property
    def out_channels(self) -> int:
        return len(self.outputs) + (1 if self.kind == "softmax" else 0)

    def targets(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        """(target array, known flag per output) for one case.

        softmax: int64 label map (0 = background); sigmoid: float (n_out, z, y, x).
        An output whose ROIs were not all contoured is unknown (flag False).
        """
        idx = {n: i for i, n in enumerate(OPENKBP_ROIS)}
        known = np.array([all(case.present[idx[r]] for r in rois) for _, rois in self.outputs])
        if self.kind == "softmax":
            lab = np.zeros(case.ct.shape, np.int64)
            for ch, (_, rois) in enumerate(self.outputs, start=1):
                for r in rois:
                    lab[case.masks[idx[r]]] = ch
            return lab, known
        tgt = np.stack([np.any([case.masks[idx[r]] for r in rois], axis=0) for _, rois in self.outputs])
        return tgt.astype(np.float32), known


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
    ),
    "hn_target": Task(
        name="hn_target",
        kind="sigmoid",
        outputs=(("PTV_High", ("PTV70",)),),
        description="High-dose planning target volume (the PTV70 region)",
    ),
}
