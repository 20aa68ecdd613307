"""What the model grid alone costs: Dice of a perfect model, through the app's own resampling.

    python -m training.grid_ceiling --models hn_oar [--spacing 3 2 2] [--json training/results/x.json]

For each OpenKBP patient, the references themselves stand in for the network: their one-hot
label map is taken to the model grid exactly as the app takes the CT there
(``autocontour.inference.to_model_grid``: anti-aliased linear resampling), used as the
model's probabilities, and brought back to the patient grid by the app's own decision
(``masks_on_patient_grid``: trilinear probabilities, argmax for softmax models, > 0.5 for
sigmoid ones).  The Dice of the result against the reference (the headline rule of
``training.evaluate``) is the ceiling that the grid sets: no model on that grid can do
better, and the gap between the ceiling and 1 is what a finer grid could win.
``--spacing`` scores another model grid (z y x mm) instead of the model's own.

``--one-voxel-shift`` also reports, per structure, the Dice of each reference with itself
moved by one patient voxel in-plane (the mean over +-y and +-x, headline rule): what a
boundary error of one voxel (~3.9 mm on OpenKBP) costs that structure's Dice, the scale
against which a model's Dice on these references can be read.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import yaml

from autocontour import inference
from autocontour.model_config import ModelKind, load_model_config
from autocontour.volume import to_canonical
from training import metrics
from training.evaluate import PARTIAL_LENGTH, add_model_arguments, case_volume, patient_files, score, summarise
from training.tasks import reference_mask

logger = logging.getLogger("training.grid_ceiling")


def ceiling_masks(refs: dict[str, np.ndarray], volume, spacing_zyx, kind) -> dict[str, np.ndarray]:
    """The masks a model that is perfect on a ``spacing_zyx`` grid would get from the app,
    for the references ``refs`` (bool, the volume's (k, j, i) order)."""
    kind = ModelKind(kind)
    view = to_canonical(volume)
    step = np.array(spacing_zyx, float) / np.array(view.spacing_zyx)
    labels = list(refs)
    if kind is ModelKind.SOFTMAX:  # background first; a voxel in two references goes to the first
        taken = np.zeros(volume.array.shape, bool)
        onehot = []
        for name in labels:
            m = refs[name] & ~taken
            taken |= m
            onehot.append(m)
        channels = [~taken] + onehot
    else:
        channels = [refs[name] for name in labels]
    probs = np.stack([inference.to_model_grid(view.forward(c).astype(np.float32), step) for c in channels])
    box = tuple(slice(0, n) for n in probs.shape[1:])
    canon_shape = view.forward(volume.array).shape
    out = {name: np.zeros(volume.array.shape, bool) for name in labels}
    for c, sl, mask in inference.masks_on_patient_grid(probs, kind, box, step, canon_shape):
        view.forward(out[labels[c]])[sl] |= mask
    return out


def one_voxel_shift_dice(ref: np.ndarray, partial: bool) -> float:
    """Mean Dice of a (z, y, x) reference with itself moved by one voxel along +-y and +-x
    (what falls off the grid is lost); ``partial``: scored on the reference's slices only."""
    out = []
    for axis in (1, 2):
        for step in (1, -1):
            src, dst = [slice(None)] * 3, [slice(None)] * 3
            src[axis], dst[axis] = (slice(0, -1), slice(1, None)) if step > 0 else (slice(1, None), slice(0, -1))
            moved = np.zeros_like(ref)
            moved[tuple(dst)] = ref[tuple(src)]
            a, b = metrics.restrict_to_slices(moved, ref) if partial else (moved, ref)
            out.append(metrics.dice(a, b))
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="another model grid, mm")
    ap.add_argument("--one-voxel-shift", action="store_true",
                    help="also the Dice of each reference with itself moved one voxel in-plane")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    paths = patient_files(args.data, args.limit, args.last)
    result = {}
    for name in args.models:
        cfg = load_model_config(args.models_dir / name)
        rois = yaml.safe_load((cfg.folder / "model.yaml").read_text())["output"]["source_rois"]
        spacing = tuple(args.spacing) if args.spacing else tuple(cfg.spacing_zyx)
        per: dict[str, list[dict]] = {}
        shifted: dict[str, list[float]] = {}
        grids = []
        for path in paths:
            vol, case = case_volume(path)
            grids.append(case.spacing_zyx)
            refs = {label: reference_mask(tuple(rois[label]), case) for label in cfg.labels}
            known = {k: v for k, v in refs.items() if v is not None and v.any()}
            if cfg.kind == ModelKind.SOFTMAX:  # every label a channel, unknown ones empty
                masks = ceiling_masks({k: known.get(k, np.zeros(vol.array.shape, bool)) for k in cfg.labels},
                                      vol, spacing, cfg.kind)
            else:
                masks = ceiling_masks(known, vol, spacing, cfg.kind) if known else {}
            for label, ref in known.items():
                per.setdefault(label, []).append(score(masks[label], ref, case.spacing_zyx, label in PARTIAL_LENGTH))
                if args.one_voxel_shift:
                    shifted.setdefault(label, []).append(one_voxel_shift_dice(ref, label in PARTIAL_LENGTH))
        summary = summarise(per)
        result[name] = {
            "data": args.data.name, "patients": len(paths), "model_grid_zyx_mm": list(spacing),
            "patient_grid_median_zyx_mm": [round(float(v), 2) for v in np.median(np.array(grids), axis=0)],
            **summary,
        }
        if shifted:
            result[name]["one_voxel_shift_dice"] = {k: round(float(np.mean(v)), 4) for k, v in shifted.items()}
        logger.info("%s on a %s mm grid: headline ceiling %s %s", name, spacing, summary["headline_dice_mean"],
                    summary["headline_dice_per_structure"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({n: {k: r[k] for k in ("model_grid_zyx_mm", "patient_grid_median_zyx_mm",  # noqa: T201
                                            "headline_dice_per_structure", "headline_dice_mean",
                                            "one_voxel_shift_dice") if k in r}
                      for n, r in result.items()}, indent=1))


if __name__ == "__main__":
    main()
