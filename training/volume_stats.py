"""Plausible volume range per structure from the OpenKBP training contours.

    python -m training.volume_stats

Prints, per structure, the 2.5th and 97.5th percentile of the clinical volumes (cc) in
``train`` and the range used in ``autocontour/structures.py`` (widened by 50 %: low / 1.5,
high * 1.5).  Validation patients are not read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.data import Case
from training.tasks import TASKS, reference_mask

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/openkbp/train")
    args = ap.parse_args()
    volumes: dict[str, list[float]] = {}
    for path in sorted(args.data.glob("*.npz")):
        z = np.load(path)
        masks = np.unpackbits(z["masks"], axis=-1).astype(bool)
        voxel_cc = float(np.prod(z["voxel_mm"])) / 1000.0
        case = Case(path.stem, z["ct_hu"], masks, z["roi_present"].astype(bool), (0.0, 0.0, 0.0))
        for task in TASKS.values():
            for name, rois in task.outputs:
                m = reference_mask(rois, case)  # the rule training and evaluation use
                if m is not None:
                    volumes.setdefault(name, []).append(float(m.sum() * voxel_cc))
    out = {}
    for name, v in volumes.items():
        lo, hi = np.percentile(v, [2.5, 97.5])
        out[name] = {"n": len(v), "p2.5": round(lo, 1), "p97.5": round(hi, 1),
                     "range_cc": [round(lo / 1.5, 1), round(hi * 1.5, 1)]}
    print(json.dumps(out, indent=1))  # noqa: T201 - command-line report


if __name__ == "__main__":
    main()
