"""Render ``models/<name>/README.md`` (the model card) from its model.yaml.

    python -m training.model_card hn_oar hn_target

Every figure in the card comes from model.yaml (written by ``training/export.py`` and
``training/evaluate.py --write``, ``training/evaluate_dicom.py --write``), so the card and the facts never disagree.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from training.reference_qa import WITHOUT_FLAGGED

ROOT = Path(__file__).resolve().parent.parent

FLOORS = {
    "hn_oar": "mean Dice >= 0.80 over the seven organs, none below 0.65",
    "hn_target": "PTV_High Dice >= 0.60; PTV_Mid and PTV_Low reported",
}


def app_dicom_section(a: dict | None, v: dict) -> list[str]:
    """The card's lines for ``validation_app_dicom`` (``training.evaluate_dicom --write``):
    the whole app on the validation patients as 512 x 512 DICOM, beside the model-grid figures ``v``."""
    if not a:
        return []
    grid = v.get("headline_dice_per_structure") or {}
    lines = [
        "",
        f"### Through the whole app on 512 x 512 DICOM ({a['patients']} patients)",
        "",
        f"Measured with `{a['command']}`: each validation CT upsampled 4x in-plane (0.977 mm pixels, the same "
        "500 mm field) and written as a DICOM series, `app.py` run on it as a user runs it (both models, "
        "post-processing, writers), and its RTSTRUCT read back. Scored on the reference's own grid (a voxel "
        "inside when at least half of its 16 fine pixels are) and, beside it, on the 512 grid against the "
        "reference drawn as 4 x 4 blocks; headline rule as above. The model-grid column repeats the table above.",
        "",
        "| structure | app path, reference grid | app path, 512 grid | model-grid path (above"
        + (", post-processed) |" if v.get("postprocessed") else ", raw network output) |"),
        "|---|---|---|---|",
    ]
    fine = a.get("dice_fine_grid_headline_per_structure") or {}
    for k, d in a["headline_dice_per_structure"].items():
        g = grid.get(k)
        lines.append(f"| {k} | {d:.3f} | {fine.get(k, float('nan')):.3f} | {'-' if g is None else f'{g:.3f}'} |")
    lines += [
        "",
        f"Headline mean: **{a['headline_dice_mean']:.3f}** on the reference grid, "
        f"{a.get('dice_fine_grid_headline_mean', float('nan')):.3f} on the 512 grid"
        + (f" (model-grid path: {v['headline_dice_mean']:.3f})" if v.get("headline_dice_mean") is not None else "")
        + f". The app took {a['app_seconds_per_patient']} s per CT here (128 slices of 512 x 512, both models, "
        "no QA pictures).",
    ]
    return lines


def render(meta: dict) -> str:
    v = meta.get("validation") or {}
    t = meta["training"]
    lines = [
        f"# Model card: {meta['name']} {meta['version']}",
        "",
        meta.get("description", ""),
        "",
        "## What it does",
        f"- Output ({meta['output']['kind']}): " + ", ".join(
            f"`{k}` (from OpenKBP {', '.join(r)})" for k, r in meta["output"]["source_rois"].items()
        ),
        f"- Input: CT in HU, {meta['input']['orientation']}, resampled to "
        f"{' x '.join(str(s) for s in meta['input']['spacing_zyx_mm'])} mm (z, y, x), window "
        f"{meta['input']['window_hu']} HU, {meta['input']['normalisation']}; sliding window "
        f"{' x '.join(str(p) for p in meta['input']['patch_zyx'])} voxels with Gaussian blending.",
        f"- Network: {meta['network']['architecture']}, channels {meta['network']['channels']}, "
        f"{meta['network']['parameters'] / 1e6:.1f} M parameters.",
        f"- Files: `{meta['files']['onnx']['path']}` (ONNX opset {meta['files']['onnx']['opset']}, what the app runs; "
        f"sha256 `{meta['files']['onnx']['sha256']}`), `{meta['files']['torchscript']['path']}` (TorchScript, for the "
        "SDK's stock operators).",
        "",
        "## Training",
        f"- Data: {t['data']}.",
        f"- Checkpoint: iteration {t['iteration']} (best mean Dice {t['holdout_mean_dice']} on the 10 held-out train "
        "patients); the curve is `training.holdout_history` in model.yaml.",
        "- Command and seed: see [training/README.md](../../training/README.md).",
    ]
    if t.get("released"):
        lines.append(f"- Released {t['released']}")
    control = v.get("recipe_control")
    lines += [
        "",
        "## Validation of the recipe (OpenKBP validation, 33 patients these weights were also trained on)" if control
        else "## Validation (OpenKBP validation, 33 patients never used in training)",
    ]
    if control:
        lines += [
            f"The figures below are the recipe's: {control['note']} (control: iteration {control['iteration']}, "
            f"ONNX sha256 `{control['onnx_sha256']}`).",
            "",
        ]
    if v:
        lines += [
            f"Measured with `{v.get('command', 'python -m training.evaluate --write')}` on the exported ONNX model "
            "through the app's own inference path (test-time mirroring "
            f"{'on' if v.get('test_time_mirroring') else 'off'})"
            + (" and its post-processing (External, stray pieces, holes: the contours the clinician receives)"
               if v.get("postprocessed") else "")
            + ", on each patient's own grid; a structure is scored "
            "only for patients where it was contoured. Surface Dice at 3 mm and HD95 are in mm on that grid "
            "(in-plane 2.7-5.4 mm). For organs contoured over a clinician-chosen length (Brainstem, SpinalCord, "
            "Esophagus) the headline uses the reference's slices only, as the AAPM 2017 thoracic challenge scored "
            "cord and esophagus; the whole-scan figure is beside it.",
            "",
            "| structure | Dice (headline) | Dice, whole scan | surface Dice 3 mm | HD95 mm | patients |",
            "|---|---|---|---|---|---|",
        ]
        for k, e in v["per_structure"].items():
            ref = "_ref_slices" if "dice_ref_slices" in e else ""
            hd = e.get("hd95_mm" + ref)
            lines.append(
                f"| {k} | {v['headline_dice_per_structure'][k]:.3f} | {e['dice']:.3f} | "
                f"{e['surface_dice_3mm' + ref]:.3f} | {'-' if hd is None else f'{hd:.1f}'} | {e['cases']} |"
            )
        lines += [
            "",
            f"Headline mean over structures: **{v['headline_dice_mean']:.3f}** (lowest: "
            f"{v['headline_dice_min_structure']}). Target set by the project: {FLOORS.get(meta['name'], '-')}.",
            "",
        ]
        clean = v.get(WITHOUT_FLAGGED)
        if clean and clean.get("headline_dice_mean") is not None:
            left_out = "; ".join(f"{s} {', '.join(p)}" for s, p in clean["excluded"].items()) or "none"
            lines += [
                "Beside it, not instead of it: the same scores without the references that cannot be scored "
                "(`python -m training.reference_qa`: a contour 4 times larger or smaller in cross-section than "
                "the organ's train median, or a CT with air where an organ's contour lies; a picture of each in "
                "`training/results/reference-qa/`): mean **" + f"{clean['headline_dice_mean']:.3f}** ("
                + ", ".join(f"{s} {d:.3f}" for s, d in clean["headline_dice_per_structure"].items())
                + f"); left out: {left_out}.",
                "",
            ]
        lines += [
            f"CPU time per patient (OpenKBP 128^3 grid, ONNX Runtime, 2 cores): {v.get('seconds_per_patient')} s.",
        ]
    else:
        lines.append("Not measured yet.")
    lines += app_dicom_section(meta.get("validation_app_dicom"), v)
    abl = meta.get("ablation") or []
    if abl:
        lines += [
            "",
            "## Ablation (OpenKBP validation, headline Dice as above)",
            "",
            "| change | headline mean Dice | what it added | measured with |",
            "|---|---|---|---|",
        ]
        for a in abl:
            dice = "-" if a["headline_dice_mean"] is None else f"{a['headline_dice_mean']:.3f}"  # None: no fair figure
            lines.append(f"| {a['change']} | {dice} | {a.get('added', '-')} | `{a['command']}` |")
    hist = t.get("holdout_history") or []
    if hist:
        lines += [
            "",
            "## Learning curve (mean Dice on the 10 held-out train patients)",
            "",
            "| iteration | " + " | ".join(hist[0]["holdout_dice"]) + " |",
            "|---" * (len(hist[0]["holdout_dice"]) + 1) + "|",
        ]
        for h in hist:
            lines.append(f"| {h['iteration']} | " + " | ".join(f"{d:.3f}" for d in h["holdout_dice"].values()) + " |")
        lines += [
            "",
            "A 0.000 for a structure usually means it was contoured for none or few of the held-out patients "
            "(Esophagus and Larynx are missing for about half of OpenKBP).",
        ]
    if meta.get("gap"):
        lines += ["", "## Gap to the project's target", "", meta["gap"]]
    lines += [
        "",
        "## Limits",
        "- Trained on 160 patients of one public challenge set with its contouring conventions, on a CPU with a "
        "small network and a short schedule; accuracy on other institutions' CTs is unknown until measured there.",
        "- Every output is an automatic proposal to be reviewed and edited by a clinician.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+")
    args = ap.parse_args()
    for name in args.names:
        folder = ROOT / "models" / name
        meta = yaml.safe_load((folder / "model.yaml").read_text())
        (folder / "README.md").write_text(render(meta))


if __name__ == "__main__":
    main()
