"""Dice of the exported ONNX models on OpenKBP patients, on each patient's own grid.

    python -m training.evaluate                      # all 33 validation patients, both models
    python -m training.evaluate --limit 2 --models hn_oar

Runs the app's own inference path (``autocontour.segmenter.Segmenter.predict`` on the ONNX Runtime
CPU backend), not the training checkpoint; with ``--postprocess`` also the app's clinical-constraint
post-processing (``autocontour.postprocess.postprocess``: External, stray components, holes,
targets clipped to the External, nested levels), so the figures are those of the contours the
clinician receives.  ``--write`` stores the result in each
``models/<name>/model.yaml`` under ``validation``.  A model trained on these patients too
(``training.train --extra-data``, once validation has fixed the recipe) is not scored as its
own validation: ``--models-dir CONTROL --write-recipe-for models`` stores the figures of the
recipe's control (the same stage without them) in its model.yaml, marked as such.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from autocontour.model_config import load_model_config
from autocontour.postprocess import postprocess
from autocontour.segmenter import open_segmenters
from autocontour.volume import Volume
from training import metrics, reference_qa
from training.data import Case, load_openkbp
from training.tasks import reference_mask

logger = logging.getLogger("training.evaluate")
ROOT = Path(__file__).resolve().parent.parent


def case_volume(path: Path) -> tuple[Volume, Case]:
    """An OpenKBP patient as a Volume (canonical LPS axes) and the case with its references."""
    case = load_openkbp(path)
    dz, dy, dx = case.spacing_zyx
    affine = np.eye(4)
    affine[:3, 0] = (0, 0, dz)
    affine[:3, 1] = (0, dy, 0)
    affine[:3, 2] = (dx, 0, 0)
    vol = Volume(array=case.ct.astype(np.float32), affine=affine, series_instance_uid=path.stem)
    return vol, case


# Organs contoured over a clinician-chosen length: also scored on the reference's own slices
# (as the AAPM 2017 thoracic challenge scored cord and esophagus); the headline figure uses it.
PARTIAL_LENGTH = ("Brainstem", "SpinalCord", "Esophagus")
SURFACE_TOLERANCE_MM = 3.0


def score(pred: np.ndarray, ref: np.ndarray, spacing_zyx: tuple[float, float, float], partial: bool) -> dict:
    """Dice, surface Dice at 3 mm and HD95 (mm) of one structure; for partial-length organs
    also the three on the reference's slices only (``*_ref_slices``)."""
    out = {
        "dice": metrics.dice(pred, ref),
        "surface_dice_3mm": metrics.surface_dice(pred, ref, spacing_zyx, SURFACE_TOLERANCE_MM),
        "hd95_mm": metrics.hd95(pred, ref, spacing_zyx),
    }
    if partial:
        p, r = metrics.restrict_to_slices(pred, ref)
        out["dice_ref_slices"] = metrics.dice(p, r)
        out["surface_dice_3mm_ref_slices"] = metrics.surface_dice(p, r, spacing_zyx, SURFACE_TOLERANCE_MM)
        out["hd95_mm_ref_slices"] = metrics.hd95(p, r, spacing_zyx)
    return out


def summarise(per: dict[str, list[dict]]) -> dict:
    """Per-structure means (NaN HD95 of empty predictions left out and counted) and the
    headline mean Dice over structures, partial-length organs on their reference's slices."""
    table, headline = {}, {}
    for label, rows in per.items():
        keys = rows[0].keys()
        entry = {}
        for k in keys:
            vals = np.array([r[k] for r in rows], float)
            entry[k] = round(float(np.nanmean(vals)), 4) if np.isfinite(vals).any() else None
        entry["cases"] = len(rows)
        entry["empty_predictions"] = int(sum(np.isnan(r["hd95_mm"]) for r in rows))
        table[label] = entry
        headline[label] = entry.get("dice_ref_slices", entry["dice"])
    return {
        "per_structure": table,
        "dice_mean_over_structures": round(float(np.mean([e["dice"] for e in table.values()])), 4),
        "headline_dice_per_structure": headline,
        "headline_dice_mean": round(float(np.mean(list(headline.values()))), 4),
        "headline_dice_min_structure": min(headline, key=headline.get),
        "headline_rule": "mean Dice over structures; " + ", ".join(PARTIAL_LENGTH)
        + " on the reference's slices only",
    }


def patient_files(data: Path, limit: int | None = None, last: int | None = None) -> list[Path]:
    """The OpenKBP patients in ``data`` by patient number: the first ``limit`` of them, or the
    last ``last`` (``--data .../train --last 10``: the trainer's held-out patients)."""
    paths = sorted(data.glob("*.npz"), key=lambda p: int(p.stem.split("_")[-1]))
    return paths[-last:] if last else paths[:limit]


def data_label(data: Path) -> str:
    """How a result names its patients' folder: ``data/openkbp/validation``, not the machine's path."""
    return str(data.relative_to(data.parents[2])) if len(data.parents) > 2 else str(data)


PER_PATIENT = "per_patient_headline_dice"  # in --json only: training.compare's input


def without_per_patient(result: dict) -> dict:
    """One model's result without its per-patient rows (what is printed and stored in model.yaml)."""
    return {k: v for k, v in result.items() if k != PER_PATIENT}


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments that choose the models and the patients (shared with training.grid_ceiling)."""
    ap.add_argument("--models", nargs="+", default=["hn_oar", "hn_target"])
    ap.add_argument("--models-dir", type=Path, default=ROOT / "models")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/openkbp/validation")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--limit", type=int, help="the first N patients by number")
    which.add_argument("--last", type=int, metavar="N",
                       help="the last N patients by number (with the train folder: the trainer's --holdout patients)")
    ap.add_argument("--json", type=Path, help="also write the result to this file")


def evaluate(
    models_dir: Path, names: list[str], data: Path, limit: int | None, mirror: bool | None = None,
    postprocessed: bool = False, ensemble_with: list[Path] = (), last: int | None = None,
) -> dict:
    """``mirror``: test-time mirroring forced on or off; None runs each model as the app does.
    ``postprocessed``: score the masks after the app's post-processing (each model's
    structures with their own External), not the raw network output.
    ``ensemble_with``: further model folders (``DIR/<name>``, same labels and grid) whose
    networks are averaged with each model's (logits, ``Segmenter.members``)."""
    cfgs = [load_model_config(models_dir / n) for n in names]
    segmenters = {s.name: s for s in open_segmenters(cfgs, "cpu", mirror=mirror)}
    for name, seg in segmenters.items():
        for folder in ensemble_with:
            other = load_model_config(folder / name)
            if (other.labels, other.spacing_zyx, other.window_hu, other.kind) != (
                seg.model.labels, seg.model.spacing_zyx, seg.model.window_hu, seg.model.kind
            ):
                raise SystemExit(f"{folder / name}: labels, grid, window or kind differ from {seg.model.folder}")
            seg.members.append(open_segmenters([other], "cpu")[0].backend)
    paths = patient_files(data, limit, last)
    per: dict[str, dict[str, list[dict]]] = {c.name: {} for c in cfgs}
    # headline Dice per patient and structure: paired comparisons of two models (training.compare)
    per_patient: dict[str, dict[str, dict[str, float]]] = {c.name: {} for c in cfgs}
    seconds: dict[str, list[float]] = {c.name: [] for c in cfgs}
    for path in paths:
        vol, case = case_volume(path)
        for cfg in cfgs:
            t0 = time.perf_counter()
            masks = segmenters[cfg.name].predict(vol)
            seconds[cfg.name].append(time.perf_counter() - t0)
            if postprocessed:
                masks = {k: r.mask for k, r in postprocess(vol, masks).items() if k in masks}
            yml = yaml.safe_load((cfg.folder / "model.yaml").read_text())
            for label in cfg.labels:
                ref = reference_mask(tuple(yml["output"]["source_rois"][label]), case)
                if ref is None:
                    continue
                row = score(masks[label], ref, case.spacing_zyx, label in PARTIAL_LENGTH)
                per[cfg.name].setdefault(label, []).append(row)
                per_patient[cfg.name].setdefault(path.stem, {})[label] = round(
                    float(row.get("dice_ref_slices", row["dice"])), 4)
        logger.info("%s: %s", path.stem,
                    {m: {k: round(v[-1]["dice"], 3) for k, v in s.items()} for m, s in per.items()})
    result = {}
    for name, rows in per.items():
        result[name] = {
            "data": data_label(data),
            "patients": len(paths),
            "test_time_mirroring": segmenters[name].mirror,
            "postprocessed": postprocessed,
            "ensemble_with": [str(f) for f in ensemble_with],
            **summarise(rows),
            "seconds_per_patient": round(float(np.mean(seconds[name])), 3),
            PER_PATIENT: per_patient[name],
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    tta = ap.add_mutually_exclusive_group()
    tta.add_argument("--mirror", dest="mirror", action="store_true", default=None,
                     help="force test-time mirroring on (default: as model.yaml says, as the app runs)")
    tta.add_argument("--no-mirror", dest="mirror", action="store_false", help="force it off (ablation)")
    ap.add_argument("--postprocess", action="store_true",
                    help="score after the app's post-processing (what the clinician receives), not the raw output")
    ap.add_argument("--reference-qa", type=Path, metavar="JSON", nargs="?", const=reference_qa.DEFAULT_JSON,
                    help="also report the figures without the references flagged by training.reference_qa "
                         f"(default file: {reference_qa.DEFAULT_JSON.relative_to(ROOT)}); the headline stays over all")
    ap.add_argument("--ensemble-with", type=Path, nargs="+", default=[], metavar="DIR",
                    help="average each model with DIR/<name> (an exported candidate): the ensemble's Dice")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--write", action="store_true", help="store the result in models/<name>/model.yaml")
    out.add_argument("--write-recipe-for", type=Path, metavar="DIR",
                     help="the evaluated models are the recipe's controls (trained without these patients): store "
                          "the result in DIR/<name>/model.yaml, whose weights were trained on them (--extra-data)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # what could not be stored is refused before the minutes of scoring
    controls = {}  # --write-recipe-for: name -> validation.recipe_control of the released model
    for name in args.models if args.write or args.write_recipe_for else []:
        meta = _meta(args.models_dir, name)
        if trained_on(meta, args.data):
            raise SystemExit(
                f"{args.models_dir / name} was trained on the patients of {args.data} (training --extra-data): "
                "its Dice there is memory, not validation. Evaluate the recipe's control, trained without them, "
                f"and store it with --models-dir CONTROL --write-recipe-for {args.models_dir}")
        if args.write_recipe_for:
            controls[name] = recipe_control(meta, _meta(args.write_recipe_for, name), args.data)
    result = evaluate(args.models_dir, args.models, args.data, args.limit, mirror=args.mirror,
                      postprocessed=args.postprocess, ensemble_with=args.ensemble_with, last=args.last)
    if args.reference_qa:
        flags = reference_qa.load_flags(args.reference_qa, reference_qa.split_of(args.data))
        for r in result.values():
            r[reference_qa.WITHOUT_FLAGGED] = reference_qa.without_flagged(r, flags)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps({n: without_per_patient(r) for n, r in result.items()}, indent=1))  # noqa: T201 - a report
    target = args.models_dir if args.write else args.write_recipe_for
    if target:
        command = ("python -m training.evaluate --models-dir CONTROL --write-recipe-for DIR" if args.write_recipe_for
                   else "python -m training.evaluate --write")
        command += ({None: "", True: " --mirror", False: " --no-mirror"}[args.mirror]
                    + (" --postprocess" if args.postprocess else "")
                    + (" --reference-qa" if args.reference_qa else ""))
        for name in args.models:
            p = target / name / "model.yaml"
            meta = yaml.safe_load(p.read_text())
            meta["validation"] = {**without_per_patient(result[name]), "command": command}
            if name in controls:
                meta["validation"]["recipe_control"] = controls[name]
            p.write_text(yaml.safe_dump(meta, sort_keys=False, width=120))


def _meta(models_dir: Path, name: str) -> dict:
    return yaml.safe_load((models_dir / name / "model.yaml").read_text())


def trained_on(meta: dict, data: Path) -> bool:
    """Whether the model of ``meta`` (its model.yaml) was trained on the patients of ``data``
    (``training.train --extra-data``, recorded in its stage): its Dice there is no validation."""
    stage = (meta.get("training") or {}).get("stage") or {}
    return any((ROOT / folder).resolve() == data.resolve() for folder in stage.get("extra_data") or [])


def recipe_control(control: dict, released: dict, data: Path) -> dict:
    """What ``validation.recipe_control`` says in the released model's model.yaml: the figures
    are those of ``control``, the same recipe trained without the patients of ``data``.

    Refused unless the released model was trained on ``data`` and the control was not, and
    both ran the same stage apart from the extra data (the recipe is what is measured)."""
    if not trained_on(released, data):
        raise SystemExit(f"--write-recipe-for: {released['name']} {released['version']} was not trained on {data}; "
                         "store its own figures with --write")
    same = {k: v for k, v in released["training"]["stage"].items() if k != "extra_data"}
    ctl = {k: v for k, v in (control["training"].get("stage") or {}).items() if k != "extra_data"}
    if same != ctl:
        raise SystemExit(f"--write-recipe-for: the control's stage {ctl} is not the released model's {same} "
                         "without its extra data: it does not measure the recipe")
    return {
        "onnx_sha256": control["files"]["onnx"]["sha256"],
        "iteration": control["training"].get("iteration"),
        "note": f"the same stage trained without the {data.name} patients; the released weights were also "
                "trained on them, so their own Dice there is not a measure",
    }


if __name__ == "__main__":
    main()
