"""Dice of the exported ONNX models on OpenKBP patients, on each patient's own grid.

    python -m training.evaluate                      # all 33 validation patients, both models
    python -m training.evaluate --limit 2 --models hn_oar

Runs the app's own inference path (``autocontour.inference.segment`` on the ONNX Runtime
CPU backend), not the training checkpoint.  ``--write`` stores the result in each
``models/<name>/model.yaml`` under ``validation``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from autocontour.backends import select_backend
from autocontour.inference import segment
from autocontour.model_config import load_model_config
from autocontour.volume import Volume
from training.data import OPENKBP_ROIS, load_openkbp

logger = logging.getLogger("training.evaluate")
ROOT = Path(__file__).resolve().parent.parent


def case_volume(path: Path) -> tuple[Volume, dict[str, np.ndarray | None]]:
    """An OpenKBP patient as a Volume (canonical LPS axes) and its reference masks by ROI name."""
    case = load_openkbp(path)
    dz, dy, dx = case.spacing_zyx
    affine = np.eye(4)
    affine[:3, 0] = (0, 0, dz)
    affine[:3, 1] = (0, dy, 0)
    affine[:3, 2] = (dx, 0, 0)
    vol = Volume(array=case.ct.astype(np.float32), affine=affine, series_instance_uid=path.stem)
    refs = {n: (case.masks[i] if case.present[i] else None) for i, n in enumerate(OPENKBP_ROIS)}
    return vol, refs


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def evaluate(models_dir: Path, names: list[str], data: Path, limit: int | None) -> dict:
    cfgs = [load_model_config(models_dir / n) for n in names]
    backends = {c.name: select_backend(c, "cpu")[0] for c in cfgs}
    paths = sorted(data.glob("*.npz"), key=lambda p: int(p.stem.split("_")[-1]))[:limit]
    scores: dict[str, dict[str, list[float]]] = {c.name: {} for c in cfgs}
    seconds: dict[str, list[float]] = {c.name: [] for c in cfgs}
    for path in paths:
        vol, refs = case_volume(path)
        for cfg in cfgs:
            t0 = time.perf_counter()
            masks = segment(vol, cfg, backends[cfg.name])
            seconds[cfg.name].append(time.perf_counter() - t0)
            yml = yaml.safe_load((cfg.folder / "model.yaml").read_text())
            for label in cfg.labels:
                rois = yml["output"]["source_rois"][label]
                if any(refs[r] is None for r in rois):
                    continue
                ref = np.any([refs[r] for r in rois], axis=0)
                scores[cfg.name].setdefault(label, []).append(dice(masks[label], ref))
        logger.info("%s: %s", path.stem, {m: {k: round(v[-1], 3) for k, v in s.items()} for m, s in scores.items()})
    result = {}
    for name, per in scores.items():
        means = {k: round(float(np.mean(v)), 4) for k, v in per.items()}
        result[name] = {
            "data": str(data.relative_to(data.parents[2])) if len(data.parents) > 2 else str(data),
            "patients": len(paths),
            "dice_mean_per_structure": means,
            "cases_per_structure": {k: len(v) for k, v in per.items()},
            "dice_mean_over_structures": round(float(np.mean(list(means.values()))), 4),
            "dice_min_structure": min(means, key=means.get),
            "seconds_per_patient": round(float(np.mean(seconds[name])), 3),
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["hn_oar", "hn_target"])
    ap.add_argument("--models-dir", type=Path, default=ROOT / "models")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/openkbp/validation")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--write", action="store_true", help="store the result in models/<name>/model.yaml")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = evaluate(args.models_dir, args.models, args.data, args.limit)
    print(json.dumps(result, indent=1))  # noqa: T201 - this is a command-line report
    if args.write:
        for name in args.models:
            p = args.models_dir / name / "model.yaml"
            meta = yaml.safe_load(p.read_text())
            meta["validation"] = {**result[name], "command": "python -m training.evaluate --write"}
            p.write_text(yaml.safe_dump(meta, sort_keys=False, width=120))


if __name__ == "__main__":
    main()
