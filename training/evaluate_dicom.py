"""Dice of the whole app on OpenKBP patients written as 512 x 512 DICOM planning CTs.

    python -m training.evaluate_dicom [--limit N] [--upsampling linear|nearest|cubic] [--json FILE] [--write]

``training.evaluate`` scores the models on each patient's own 128 x 128 grid (3.9 mm
pixels).  The patients the models are finally judged on arrive as clinical CTs instead:
512 x 512 slices read from DICOM, taken to the model grid from 0.98 mm pixels, decided on
the 512 grid, written as an RTSTRUCT and read back by a planning system.  This measures
that path, end to end, on the same patients:

1. each OpenKBP CT is upsampled 4x in-plane (linear, pixel areas aligned, so the 512
   pixels of 0.977 mm cover the same 500 mm field as the 128 of 3.906 mm, as a clinical
   reconstruction does) and written as a DICOM series (``tools.openkbp_to_dicom``);
2. ``app.py`` runs on it as a user runs it (a subprocess; its exit code must be 0);
3. the RTSTRUCT it wrote is read back onto the 512 grid (``autocontour.readback``);
4. each structure is scored (a) on the reference's own 128 grid: a 128-grid voxel is
   inside when at least half of its 16 fine pixels are (``to_coarse``), with
   ``training.evaluate.score`` (Dice, surface Dice at 3 mm, HD95; partial-length organs
   also on the reference's slices), so that ``training.compare`` pairs it patient by
   patient with ``training.evaluate --postprocess``; and (b) as Dice on the 512 grid
   against the reference upsampled to it (each reference voxel a 4 x 4 block:
   ``dice_fine_grid_headline_*``, headline rule).

The JSON has ``training.evaluate``'s layout per model (and the app's wall time per patient);
``--write`` stores the summary in each ``models/<name>/model.yaml`` under
``validation_app_dicom``, which the model card shows beside the model-grid figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
from scipy import ndimage

from autocontour.ct_volume import build_volume
from autocontour.model_config import load_model_config
from autocontour.readback import rasterise_rtstruct
from autocontour.series_selection import SelectionRules, scan_folder, select_series
from autocontour.volume import Volume, to_canonical
from deploy.runner import EXIT_CODES, VenvRunner
from tools.openkbp_to_dicom import write_ct_series
from training import metrics
from training.data import Case, load_openkbp
from training.evaluate import (
    PARTIAL_LENGTH, PER_PATIENT, add_model_arguments, data_label, patient_files, score, summarise, trained_on,
    without_per_patient,
)
from training.tasks import reference_mask

logger = logging.getLogger("training.evaluate_dicom")
ROOT = Path(__file__).resolve().parent.parent
UPSAMPLE = 4  # 128 x 3.906 mm -> 512 x 0.977 mm: the same 500 mm field
INTERPOLATION = {0: "nearest", 1: "linear", 3: "cubic"}  # --upsampling: spline order -> name
WRITE_KEY = "validation_app_dicom"  # where --write stores the summary in model.yaml


def fine_ct(case: Case, factor: int = UPSAMPLE, order: int = 1,
            ) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """The CT upsampled ``factor`` x in-plane (spline ``order``: 1 linear, 0 nearest, 3 cubic;
    pixel areas aligned), its spacing and the LPS origin of its first voxel, for a coarse
    grid whose first voxel centre is at (0, 0, 0): fine pixel (j, i) covers 1/factor of
    coarse pixel (j // factor, i // factor) in each direction."""
    dz, dy, dx = case.spacing_zyx
    ct = ndimage.zoom(case.ct.astype(np.float32), (1, factor, factor), order=order, grid_mode=True, mode="nearest")
    shift = (1.0 / factor - 1.0) / 2  # first fine centre, in coarse pixels from the first coarse centre
    return ct, (dz, dy / factor, dx / factor), (shift * dx, shift * dy, 0.0)


def to_coarse(mask: np.ndarray, factor: int = UPSAMPLE) -> np.ndarray:
    """A canonical fine-grid mask on the coarse grid: a coarse voxel is inside when at least
    half of its ``factor`` x ``factor`` fine pixels are."""
    nz, ny, nx = mask.shape
    blocks = mask.reshape(nz, ny // factor, factor, nx // factor, factor)
    return blocks.sum(axis=(2, 4)) * 2 >= factor * factor


def to_fine(mask: np.ndarray, factor: int = UPSAMPLE) -> np.ndarray:
    """A coarse-grid mask on the fine grid: each coarse voxel a ``factor`` x ``factor`` block."""
    return np.repeat(np.repeat(mask, factor, axis=1), factor, axis=2)


def run_app(ct_dir: Path, out_dir: Path, models_dir: Path) -> float:
    """``app.py`` on one CT folder as a user runs it (``deploy.runner.VenvRunner``'s command: the
    32 MiB stack ``make run`` gives it); its wall time in seconds."""
    cmd, env = VenvRunner(ROOT, timeout_s=600, python=Path(sys.executable)).command(ct_dir.resolve(), out_dir.resolve())
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + ["-m", str(models_dir.resolve()), "--no-qa", "-l", "WARNING"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        why = EXIT_CODES.get(proc.returncode, "unknown exit code")
        raise RuntimeError(f"app.py exited {proc.returncode} ({why}) on {ct_dir}: {tail[0]}")
    return time.perf_counter() - t0


def read_contours(ct_dir: Path, out_dir: Path) -> tuple[Volume, dict[str, np.ndarray]]:
    """The CT as the app reads it and the RTSTRUCT it wrote, as canonical (z, y, x) masks."""
    volume = build_volume(select_series(scan_folder(ct_dir)[0], SelectionRules()))
    (rts,) = out_dir.glob("*_RTSTRUCT.dcm")
    view = to_canonical(volume)
    masks = rasterise_rtstruct(pydicom.dcmread(rts), volume, strict=True)
    return volume, {name: np.ascontiguousarray(view.forward(m)) for name, m in masks.items()}


def evaluate_dicom(models_dir: Path, names: list[str], data: Path, limit: int | None = None,
                   last: int | None = None, keep: Path | None = None, order: int = 1) -> dict:
    """Score the app's RTSTRUCT for ``names`` on the patients of ``data`` (see the module);
    ``order``: the upsampling's spline order (``fine_ct``)."""
    cfgs = {n: load_model_config(models_dir / n) for n in names}
    rois = {n: yaml.safe_load((c.folder / "model.yaml").read_text())["output"]["source_rois"] for n, c in cfgs.items()}
    paths = patient_files(data, limit, last)
    per: dict[str, dict[str, list[dict]]] = {n: {} for n in names}
    per_patient: dict[str, dict[str, dict[str, float]]] = {n: {} for n in names}
    fine: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    seconds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="evaluate-dicom-") as tmp:
        for path in paths:
            case = load_openkbp(path)
            work = (keep or Path(tmp)) / path.stem
            ct, spacing, origin = fine_ct(case, order=order)
            write_ct_series(ct, spacing, work / "ct", origin_lps=origin, patient_id=f"OPENKBP-{path.stem}",
                            series_description=f"OpenKBP {path.stem} 512x512")
            seconds.append(run_app(work / "ct", work / "out", models_dir))
            volume, masks = read_contours(work / "ct", work / "out")
            if volume.array.shape != ct.shape:
                raise RuntimeError(f"{path.stem}: the app read {volume.array.shape}, {ct.shape} was written")
            for name, cfg in cfgs.items():
                for label in cfg.labels:
                    ref = reference_mask(tuple(rois[name][label]), case)
                    if ref is None:
                        continue
                    pred = masks.get(label, np.zeros(ct.shape, bool))
                    partial = label in PARTIAL_LENGTH
                    row = score(to_coarse(pred), ref, case.spacing_zyx, partial)
                    per[name].setdefault(label, []).append(row)
                    per_patient[name].setdefault(path.stem, {})[label] = round(
                        float(row.get("dice_ref_slices", row["dice"])), 4)
                    p, r = (pred, to_fine(ref))
                    if partial:
                        p, r = metrics.restrict_to_slices(p, r)
                    fine[name].setdefault(label, []).append(metrics.dice(p, r))
            if keep is None:
                shutil.rmtree(work)
            logger.info("%s: app %.1f s, %s", path.stem, seconds[-1],
                        {n: {k: round(v[-1]["dice"], 3) for k, v in s.items()} for n, s in per.items()})
    result = {}
    for name in names:
        summary = summarise(per[name])
        dice_fine = {label: round(float(np.mean(v)), 4) for label, v in fine[name].items()}
        result[name] = {
            "data": data_label(data),
            "patients": len(paths),
            "path": f"app.py on {UPSAMPLE}x in-plane upsampled DICOM (512 x 512, {INTERPOLATION[order]}), "
                    "RTSTRUCT read back; "
                    "scored on the reference's grid (a voxel inside when >= half its fine pixels are)",
            "postprocessed": True,
            **summary,
            "dice_fine_grid_headline_per_structure": dice_fine,
            "dice_fine_grid_headline_mean": round(float(np.mean(list(dice_fine.values()))), 4),
            "app_seconds_per_patient": round(float(np.mean(seconds)), 2),
            PER_PATIENT: per_patient[name],
        }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)  # --models, --models-dir, --data, --limit / --last, --json: as training.evaluate
    ap.add_argument("--upsampling", choices=list(INTERPOLATION.values()), default="linear",
                    help="how the 128 grid is brought to 512 (default linear; nearest and cubic: how robust the figures "
                         "are to the way a CT was reconstructed)")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="keep each patient's DICOM CT and the app's output here")
    ap.add_argument("--write", action="store_true",
                    help=f"store the result in models/<name>/model.yaml under {WRITE_KEY} (all patients only)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.write and (args.limit or args.last or args.upsampling != "linear"):
        raise SystemExit("--write stores the figures of all the patients, linearly upsampled: "
                         "leave out --limit / --last / --upsampling")
    for name in args.models if args.write else []:  # refused before the minutes of scoring
        meta = yaml.safe_load((args.models_dir / name / "model.yaml").read_text())
        if trained_on(meta, args.data):
            raise SystemExit(f"{args.models_dir / name} was trained on the patients of {args.data}: "
                             "its Dice there is memory, not validation")
    order = {name: o for o, name in INTERPOLATION.items()}[args.upsampling]
    result = evaluate_dicom(args.models_dir, args.models, args.data, args.limit, args.last, args.keep, order)
    print(json.dumps({n: without_per_patient(r) for n, r in result.items()}, indent=1))  # noqa: T201 - a report
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    for name in args.models if args.write else []:
        p = args.models_dir / name / "model.yaml"
        meta = yaml.safe_load(p.read_text())
        meta[WRITE_KEY] = {**without_per_patient(result[name]), "command": "python -m training.evaluate_dicom --write"}
        p.write_text(yaml.safe_dump(meta, sort_keys=False, width=120))


if __name__ == "__main__":
    main()
