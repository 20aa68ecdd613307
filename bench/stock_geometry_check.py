"""Where the SDK's DICOMSeriesToVolumeOperator places voxels, vs where DICOM says they are.

    python bench/stock_geometry_check.py [-i CT_FOLDER] [--slices 12]

Copies the first slices of a CT into temporary series with one geometry change each
(non-square pixels; one missing slice; 2 mm then 3 mm spacing), runs the SDK's
DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator -> DICOMSeriesToVolumeOperator on
each, and compares the affine it hands to MONAI transforms (``dicom_affine_transform``,
LPS; the NIfTI/RAS one differs only in signs) with the true positions of the voxels
(ImagePositionPatient + PixelSpacing of each slice).  Our ``autocontour.ct_volume`` is run
on the same series for contrast.  Needs this venv's MONAI Deploy SDK; no torch.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_INPUT = Path("/work/shared/data/hn-chus-052/CT")


def sorted_slices(folder: Path) -> list:
    dss = [pydicom.dcmread(p) for p in sorted(folder.iterdir()) if p.is_file()]
    dss = [d for d in dss if getattr(d, "Modality", "") == "CT"]
    return sorted(dss, key=lambda d: float(d.ImagePositionPatient[2]))


def write_series(dss: list, folder: Path, uid: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(dss):
        ds = copy.deepcopy(ds)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = f"{uid}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{i:04d}.dcm")


def true_positions(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted IPPs, the column step (i) and row step (j) vectors in mm, from the headers."""
    dss = sorted_slices(folder)
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    iop = np.array([float(v) for v in dss[0].ImageOrientationPatient])
    row_sp, col_sp = (float(v) for v in dss[0].PixelSpacing)  # PixelSpacing = [between rows, between columns]
    return ipp, iop[:3] * col_sp, iop[3:] * row_sp


def sdk_affine(folder: Path) -> np.ndarray:
    from monai.deploy.core import Fragment
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

    f = Fragment()
    studies = DICOMDataLoaderOperator(f, name="load").load_data_to_studies(folder)
    rules = json.loads('{"selections": [{"name": "CT", "conditions": {"Modality": "(?i)CT"}}]}')
    selected = DICOMSeriesSelectorOperator(f, name="select").filter(rules, studies)
    image = DICOMSeriesToVolumeOperator(f, name="convert", affine_lps_to_ras=False).convert_to_image(selected)
    # Image array is (slice k, row j, column i); MONAI transposes it to (i, j, k) and uses this affine
    return np.asarray(image.metadata()["affine"], float), image.metadata().get("depth_pixel_spacing")


def check(name: str, folder: Path) -> dict:
    from autocontour.errors import AutoContourError
    from autocontour.ct_volume import build_volume
    from autocontour.series_selection import SelectionRules, scan_folder, select_series

    ipp, di, dj = true_positions(folder)
    aff, depth = sdk_affine(folder)
    n = len(ipp)
    # where the SDK puts voxel (i, j, k) = (1, 1, k) for every slice k, vs where it is
    idx = np.stack([np.ones(n), np.ones(n), np.arange(n), np.ones(n)], 1)
    sdk_pos = (aff @ idx.T).T[:, :3]
    true = ipp + di + dj
    err = np.linalg.norm(sdk_pos - true, axis=1)
    out = {
        "series": name,
        "slices": n,
        "sdk_column_step_mm": round(float(np.linalg.norm(aff[:3, 0])), 4),
        "true_column_step_mm": round(float(np.linalg.norm(di)), 4),
        "sdk_row_step_mm": round(float(np.linalg.norm(aff[:3, 1])), 4),
        "true_row_step_mm": round(float(np.linalg.norm(dj)), 4),
        "sdk_depth_pixel_spacing_metadata": round(float(depth), 4) if depth else None,
        "sdk_max_voxel_position_error_mm": round(float(err.max()), 3),
        "sdk_position_error_far_corner_mm": None,
    }
    # the far in-plane corner shows the swapped spacings
    first = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    rows, cols = int(first.Rows), int(first.Columns)
    far = aff @ np.array([cols - 1, rows - 1, 0, 1.0])
    far_true = ipp[0] + (cols - 1) * di + (rows - 1) * dj
    out["sdk_position_error_far_corner_mm"] = round(float(np.linalg.norm(far[:3] - far_true)), 2)
    try:
        cands, _ = scan_folder(folder)
        vol = build_volume(select_series(cands, SelectionRules.from_yaml(), folder))
        ours_pos = vol.index_to_lps(np.stack([np.arange(n), np.ones(n), np.ones(n)], 1))
        out["ours"] = f"max voxel position error {np.linalg.norm(ours_pos - true, axis=1).max():.3f} mm"
    except AutoContourError as exc:
        out["ours"] = f"refused: {type(exc).__name__}: {str(exc)[:160]}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", "--input", type=Path, default=DEFAULT_INPUT)
    ap.add_argument("--slices", type=int, default=12)
    args = ap.parse_args()
    base = sorted_slices(args.input)[: args.slices]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        variants = {}
        variants["unchanged"] = [copy.deepcopy(d) for d in base]
        nonsq = [copy.deepcopy(d) for d in base]
        for d in nonsq:
            d.PixelSpacing = [0.8, 1.2]  # 0.8 mm between rows, 1.2 mm between columns
        variants["non-square pixels 0.8 x 1.2 mm"] = nonsq
        gap = [copy.deepcopy(d) for i, d in enumerate(base) if i != len(base) // 2]
        variants["one slice missing (gap)"] = gap
        uneven = [copy.deepcopy(d) for d in base]
        z0 = float(uneven[0].ImagePositionPatient[2])
        for k, d in enumerate(uneven):  # 2 mm between the first two slices, 3 mm after
            x, y, _ = (float(v) for v in d.ImagePositionPatient)
            d.ImagePositionPatient = [x, y, z0 if k == 0 else z0 + 2.0 + 3.0 * (k - 1)]
        variants["first step 2 mm, then 3 mm"] = uneven
        for i, (name, dss) in enumerate(variants.items()):
            folder = tmp / f"v{i}"
            write_series(dss, folder, f"1.2.826.0.1.3680043.8.498.99{i}")
            results.append(check(name, folder))
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
