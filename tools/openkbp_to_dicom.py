"""Write a canonical (z, y, x) CT array as a DICOM CT series in any axis-aligned orientation.

Used to make the bundled sample CT (``sample/``) from an OpenKBP validation patient, and
by the tests to build HFS/HFP/FFS/FFP, shuffled and non-square-pixel variants of the same
real anatomy.

    python -m tools.openkbp_to_dicom ../shared/data/openkbp/validation/pt_201.npz sample/ct
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["ORIENTATIONS", "write_ct_series"]

# patient position -> (row cosine = direction of increasing column index, column cosine)
ORIENTATIONS = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}


def write_ct_series(
    ct_zyx: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    out_dir: Path,
    *,
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0),
    position: str = "HFS",
    patient_id: str = "AUTOCONTOUR-SAMPLE",
    patient_name: str = "Sample^OpenKBP",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_uid: str | None = None,
    slices_descending: bool = False,
    shuffle_files: bool = False,
    scramble_instance_numbers: bool = False,
    seed: int = 0,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_description: str = "Sample CT (OpenKBP)",
) -> list[Path]:
    """Write ``ct_zyx`` (HU, canonical axes: +z superior, +y posterior, +x patient left).

    ``origin_lps`` is the LPS position of canonical voxel (0, 0, 0).  ``position`` picks
    the in-plane cosines; slice positions are the physical ones whatever the order in
    which files and InstanceNumbers are written.
    """
    row_cos, col_cos = (np.array(v, float) for v in ORIENTATIONS[position])
    nz, ny, nx = ct_zyx.shape
    dz, dy, dx = spacing_zyx
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = study_uid or generate_uid(), series_uid or generate_uid(), frame_uid or generate_uid()
    flip_x, flip_y = row_cos[0] < 0, col_cos[1] < 0
    hu = np.clip(np.rint(ct_zyx), -1024, 3071).astype(np.int16)
    order = list(range(nz))[::-1] if slices_descending else list(range(nz))
    rng = random.Random(seed)
    numbers = list(range(1, nz + 1))
    if scramble_instance_numbers:
        rng.shuffle(numbers)
    names = [f"CT{n:04d}.dcm" for n in range(nz)]
    if shuffle_files:
        rng.shuffle(names)
    paths = []
    for n, z in enumerate(order):
        img = hu[z]
        if flip_y:
            img = img[::-1]
        if flip_x:
            img = img[:, ::-1]
        x0 = origin_lps[0] + (nx - 1) * dx if flip_x else origin_lps[0]
        y0 = origin_lps[1] + (ny - 1) * dy if flip_y else origin_lps[1]
        ipp = (x0, y0, origin_lps[2] + z * dz)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        sop = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out_dir / names[n]), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(image_type)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20210101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "OpenKBP (converted)"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.PatientPosition = position
        ds.BodyPartExamined = "HEADNECK"
        ds.SliceThickness = f"{dz:g}"
        ds.KVP = "120"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = numbers[n]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:g}" for v in (*row_cos, *col_cos)]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{ipp[2]:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [f"{dy:g}", f"{dx:g}"]  # (row spacing, column spacing)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = np.ascontiguousarray(img).tobytes()
        path = out_dir / names[n]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> None:
    from training.data import load_openkbp

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("npz", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--position", default="HFS", choices=sorted(ORIENTATIONS))
    args = ap.parse_args()
    case = load_openkbp(args.npz)
    dz, dy, dx = case.spacing_zyx
    nz, ny, nx = case.ct.shape
    # centre the patient roughly like a scanner would: x, y around 0, z top at 0
    origin = (-(nx - 1) * dx / 2, -(ny - 1) * dy / 2, -(nz - 1) * dz)
    write_ct_series(case.ct, case.spacing_zyx, args.out, origin_lps=origin, position=args.position,
                    patient_id=f"OPENKBP-{args.npz.stem}", series_description=f"OpenKBP {args.npz.stem} CT")
    print(f"wrote {nz} slices to {args.out}")  # noqa: T201 - command-line tool


if __name__ == "__main__":
    main()
