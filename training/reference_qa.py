"""References that cannot be scored: a contour that is not the organ it is named after, or a
CT that does not hold the patient where the contours are.

    python -m training.reference_qa                       # flags train + validation, writes the JSON
    python -m training.reference_qa --pictures DIR        # also one picture per flagged reference
    python -m training.reference_qa --rescore RESULT.json # an evaluate result without the flagged references

Found on the validation patients' worst figures (pt_215 and pt_216 score SpinalCord Dice
0.08 and 0.07: their "SpinalCord" is a block of the posterior neck, 16-24 times a cord's cross-section,
while the model contours the cord), so every reference is checked by two fixed rules:

* **cross-section** (organs only): the reference's mean area per contoured slice is more than
  ``AREA_FACTOR`` times larger or smaller than the median of that organ over the *train*
  patients.  Area per slice, not volume, because the tubular organs are contoured over a
  length the clinician chose.  Targets are not checked: their size is the disease's.
* **air** (whole patient): at least ``AIR_FRACTION`` of an organ that holds no air (brainstem,
  cord, parotids, mandible) lies below ``AIR_HU`` in the CT.  The CT then lacks tissue where
  the contours are (pt_221: 26 % and 35 % of its parotids lie in air), so none of
  that patient's references can be compared with what a model sees: all are flagged.

The thresholds were set from the train patients' distribution (unflagged train references:
cross-section 0.3-3.1 times the median; air at most 0.8 % of a brainstem, 1.2 % of a parotid,
1.6 % of a mandible and 4.5 % of a cord, against pt_89's 22.6 %).  The headline figures of the
project are always those over every reference (``training.evaluate``); the figures without
the flagged references are reported beside them, never instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.data import Case, load_openkbp
from training.tasks import TASKS

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "training/results/reference-qa.json"

AREA_FACTOR = 4.0
AIR_HU = -400.0
AIR_FRACTION = 0.20
AIR_FREE = ("Brainstem", "SpinalCord", "Parotid_L", "Parotid_R", "Bone_Mandible")
ORGAN_TASK = "hn_oar"
WITHOUT_FLAGGED = "without_flagged_references"  # the key training.evaluate --reference-qa adds
SCORED_TASKS = ("hn_oar", "hn_target")


def references(case: Case) -> dict[str, np.ndarray]:
    """Every scored structure's reference for ``case`` (the rule training and evaluation use)."""
    out = {}
    for task in (TASKS[t] for t in SCORED_TASKS):
        out.update((name, ref) for (name, _), ref in zip(task.outputs, task.references(case)) if ref is not None)
    return out


def cross_section_mm2(mask: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """Mean area (mm^2) of a (z, y, x) mask on the slices it occupies."""
    slices = int(mask.any(axis=(1, 2)).sum())
    return float(mask.sum()) * spacing_zyx[1] * spacing_zyx[2] / slices if slices else 0.0


def air_fraction(mask: np.ndarray, ct: np.ndarray) -> float:
    """Fraction of the mask's voxels below ``AIR_HU`` in ``ct``."""
    n = int(mask.sum())
    return float((ct[mask] < AIR_HU).sum()) / n if n else 0.0


def organ_medians(paths: list[Path]) -> dict[str, float]:
    """Median cross-section (mm^2) of each organ over the patients of ``paths`` (the train set)."""
    areas: dict[str, list[float]] = {}
    organs = [n for n, _ in TASKS[ORGAN_TASK].outputs]
    for path in paths:
        case = load_openkbp(path)
        for name, mask in references(case).items():
            if name in organs:
                areas.setdefault(name, []).append(cross_section_mm2(mask, case.spacing_zyx))
    return {name: round(float(np.median(v)), 1) for name, v in areas.items()}


def flag_case(case: Case, medians: dict[str, float]) -> dict[str, str]:
    """Structure -> why its reference cannot be scored, for the flagged references of ``case``."""
    refs = references(case)
    for name in AIR_FREE:
        if name in refs and (frac := air_fraction(refs[name], case.ct)) >= AIR_FRACTION:
            why = f"air: {frac:.0%} of the {name} reference is below {AIR_HU:.0f} HU in the CT"
            return {n: why for n in refs}
    flags = {}
    for name, mask in refs.items():
        if name not in medians:
            continue
        ratio = cross_section_mm2(mask, case.spacing_zyx) / medians[name]
        if not 1.0 / AREA_FACTOR <= ratio <= AREA_FACTOR:
            flags[name] = f"cross-section: {ratio:.2f} x the train median of {medians[name]:.0f} mm^2"
    return flags


def flag_folder(data: Path, medians: dict[str, float]) -> dict[str, dict[str, str]]:
    """Patient -> structure -> reason, for every patient of ``data`` with a flagged reference."""
    out = {}
    for path in sorted(data.glob("*.npz"), key=lambda p: int(p.stem.split("_")[-1])):
        flags = flag_case(load_openkbp(path), medians)
        if flags:
            out[path.stem] = flags
    return out


def without_flagged(result: dict, flagged: dict[str, dict[str, str]]) -> dict:
    """One model's ``training.evaluate`` result (with its per-patient headline Dice) scored
    again without the flagged references: per structure mean headline Dice, the mean over
    structures, and what was left out."""
    per_patient = result["per_patient_headline_dice"]
    rows: dict[str, list[float]] = {}
    excluded: dict[str, list[str]] = {}
    for patient, scores in per_patient.items():
        for structure, dice in scores.items():
            if structure in flagged.get(patient, {}):
                excluded.setdefault(structure, []).append(patient)
            else:
                rows.setdefault(structure, []).append(dice)
    headline = {s: round(float(np.mean(v)), 4) for s, v in rows.items() if v}
    return {
        "excluded": {s: sorted(p) for s, p in excluded.items()},
        "headline_dice_per_structure": headline,
        "headline_dice_mean": round(float(np.mean(list(headline.values()))), 4) if headline else None,
        "headline_dice_min_structure": min(headline, key=headline.get) if headline else None,
        "rule": "training/reference_qa.py: references flagged by cross-section (organs) or air in the CT (patient)",
    }


def load_flags(path: Path, split: str) -> dict[str, dict[str, str]]:
    """The flagged references of one split (``train`` / ``validation``) from the JSON this writes."""
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no reference flags - write them with python -m training.reference_qa")
    return json.loads(Path(path).read_text())["flagged"].get(split, {})


def split_of(data: Path) -> str:
    """``train`` / ``validation``: the OpenKBP split a data folder holds (its folder name)."""
    return Path(data).name


def picture(case: Case, name: str, out: Path) -> None:
    """Axial (at the reference's centroid) and sagittal slices of the CT with the reference's
    outline in yellow, each pixel scaled to its size in mm."""
    from PIL import Image  # only for --pictures
    from scipy import ndimage

    mask = references(case)[name]
    zc, _, xc = np.argwhere(mask).mean(0).astype(int)
    dz, dy, dx = case.spacing_zyx

    def panel(img: np.ndarray, m: np.ndarray, sy: float, sx: float) -> Image.Image:
        grey = ((np.clip(img, -300, 500) + 300) / 800 * 255).astype(np.uint8)
        rgb = np.stack([grey] * 3, -1)
        rgb[m & ~ndimage.binary_erosion(m)] = (255, 255, 0)
        im = Image.fromarray(rgb)
        return im.resize((round(im.width * sx), round(im.height * sy)), Image.NEAREST)

    # 2 px per 3 mm; sagittal with superior up (z increases to superior)
    axial = panel(case.ct[zc], mask[zc], dy / 1.5, dx / 1.5)
    sagittal = panel(case.ct[::-1, :, xc], mask[::-1, :, xc], dz / 1.5, dy / 1.5)
    sheet = Image.new("RGB", (axial.width + sagittal.width, max(axial.height, sagittal.height)))
    sheet.paste(axial, (0, 0))
    sheet.paste(sagittal, (axial.width, 0))
    sheet.save(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared/data/openkbp")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--pictures", type=Path, metavar="DIR", help="write PATIENT-STRUCTURE.png for each flag")
    ap.add_argument("--rescore", type=Path, nargs="+", metavar="RESULT",
                    help="training.evaluate --json results: print them without the flagged references "
                         "(uses the flags already in --json)")
    args = ap.parse_args()
    if args.rescore:
        flags = {split: load_flags(args.json, split) for split in ("train", "validation")}
        for result_path in args.rescore:
            for model, result in json.loads(result_path.read_text()).items():
                flags_here = flags.get(split_of(Path(result["data"])), {})
                print(json.dumps({str(result_path): {model: without_flagged(result, flags_here)}}, indent=1))  # noqa: T201
        return
    train = sorted((args.data_root / "train").glob("*.npz"))
    medians = organ_medians(train)
    flagged = {split: flag_folder(args.data_root / split, medians) for split in ("train", "validation")}
    args.json.write_text(json.dumps({
        "command": "python -m training.reference_qa",
        "rules": {"area_factor": AREA_FACTOR, "air_hu": AIR_HU, "air_fraction": AIR_FRACTION,
                  "air_free": list(AIR_FREE)},
        "train_median_cross_section_mm2": medians,
        "flagged": flagged,
    }, indent=1))
    print(json.dumps(flagged, indent=1))  # noqa: T201 - a report
    if args.pictures:
        args.pictures.mkdir(parents=True, exist_ok=True)
        for split, patients in flagged.items():
            for patient, flags in patients.items():
                case = load_openkbp(args.data_root / split / f"{patient}.npz")
                for name, why in flags.items():
                    if not why.startswith("air") or name in AIR_FREE:
                        picture(case, name, args.pictures / f"{patient}-{name}.png")


if __name__ == "__main__":
    main()
