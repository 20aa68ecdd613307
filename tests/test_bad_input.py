"""Bad input gets a clear error, its exit code and no partial output; good input is never lost.

One table, ``CASES``: each row builds an input folder from real anatomy (40 slices of an
OpenKBP patient written as DICOM by ``write_ct_series``, or the real hn-chus-052 / TotalSeg /
dicompyler files), runs the app on it and checks

* the exit code (``autocontour.errors``),
* failures: exactly one ERROR log line, from the app, naming the file or series and saying
  what to do (`` - <fix>``), and OUTPUT left exactly as it was (a sentinel file stays, no
  SEG / RTSTRUCT / report, no staging folder);
* successes: SEG + RTSTRUCT + QA (qa/qa_sheet.png, Secondary Capture) + report.json in OUTPUT,
  the report's chosen series, and every
  UID the outputs reference belonging to that one series.

All rows run in ONE subprocess (``app.run()`` once per row; start-up is paid once), under
``unshare -n`` (no network) when root, with HOME, TMPDIR and the working directory pointed
at empty folders that must stay empty, and under ``strace -e connect`` when available (no
connection may even be attempted).  One more test runs ``python app.py`` itself to check the
process exit code and the last stderr line.  Rows that need no app run (compressed transfer
syntaxes, the memory budget, the loader fixes found by tests/test_fuzz_dicom.py) run in-process.

Models: ``models/`` of this repository; the app-level rows are skipped, saying so, until
``models/*/model.yaml`` exists.  ``AUTOCONTOUR_TEST_MODELS=/path/to/models`` points them
at another model folder (e.g. throwaway smoke models) without copying anything into the repo.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MPEG2MPML,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from autocontour import ct_volume
from autocontour.ct_volume import build_volume
from autocontour.errors import EXIT_CODES, GeometryError, InputError
from autocontour.output import STAGING_PREFIX
from autocontour.series_selection import SelectionRules, scan_folder, select_series
from tools.openkbp_to_dicom import write_ct_series

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODELS = Path(os.environ.get("AUTOCONTOUR_TEST_MODELS", ROOT / "models"))
OPENKBP = SHARED / "openkbp" / "validation"
ORIGIN = (-173.5, -173.5, -60.0)
SENTINEL = "keep.txt"  # a file the user had in OUTPUT before the run
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------- fixtures: real anatomy


@dataclass
class Anatomy:
    a: np.ndarray  # canonical (z, y, x) HU of OpenKBP pt_201
    b: np.ndarray  # and of pt_202
    spacing: tuple[float, float, float]
    cache_dir: Path | None = None  # where series written once are kept, to be copied
    written: dict = field(default_factory=dict)  # (n, start) -> folder of pt_201 slices already written


@pytest.fixture(scope="module")
def anatomy(tmp_path_factory) -> Anatomy:
    from training.data import load_openkbp

    if not (OPENKBP / "pt_201.npz").is_file():
        pytest.skip(f"OpenKBP validation patients not present under {OPENKBP}")
    a, b = load_openkbp(OPENKBP / "pt_201.npz"), load_openkbp(OPENKBP / "pt_202.npz")
    return Anatomy(a.ct, b.ct, a.spacing_zyx, tmp_path_factory.mktemp("series-cache"))


@dataclass
class Series:
    uid: str
    sops: set[str]
    paths: list[Path]  # in slice order (inferior -> superior)


def write_series(folder: Path, ct: np.ndarray, spacing, n: int = 40, start: int = 40, cache: Anatomy | None = None,
                 **kw) -> Series:
    """``n`` real slices from ``start`` as a DICOM CT series (files CT0000.dcm ... inferior first).

    With ``cache`` (and no other options) a series written before is copied (same UIDs)."""
    key, plain = (n, start), not kw
    if cache is not None and plain and key in cache.written:
        shutil.copytree(cache.written[key], folder, dirs_exist_ok=True)
        paths = [folder / f"CT{k:04d}.dcm" for k in range(n)]
    else:
        paths = write_ct_series(ct[start:start + n], spacing, folder, origin_lps=kw.pop("origin_lps", ORIGIN), **kw)
        if cache is not None and cache.cache_dir is not None and plain:
            cache.written[key] = cache.cache_dir / f"{n}-{start}"
            shutil.copytree(folder, cache.written[key])
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return Series(str(headers[0].SeriesInstanceUID), {str(h.SOPInstanceUID) for h in headers}, paths)


def edit(path: Path, fn: Callable) -> None:
    ds = pydicom.dcmread(path)
    fn(ds)
    ds.save_as(path)


def rotation_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def rotate_slice(ds, rot: np.ndarray) -> None:
    """Rotate a slice rigidly about the patient origin: orientation and position together."""
    iop = np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3) @ rot.T
    ipp = rot @ np.array([float(v) for v in ds.ImagePositionPatient])
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop.ravel()]
    ds.ImagePositionPatient = [f"{v:.5f}" for v in ipp]


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    name: str
    rc: int
    message: str  # regex the one ERROR line must match (failures)
    build: Callable  # (case_dir, anatomy) -> spec dict
    warns: str = ""  # regex some WARNING line must match
    requires: tuple[str, ...] = ()  # paths under SHARED
    root_ok: bool = True  # False: meaningless as root (chmod does not stop root)


CASES: list[Case] = []


def case(name, rc, message="", warns="", requires=(), root_ok=True):
    def register(build):
        CASES.append(Case(name, rc, message, build, warns, requires, root_ok))
        return build

    return register


def _in(d: Path) -> Path:
    (d / "in").mkdir(parents=True, exist_ok=True)
    return d / "in"


# ---- input folder / files: exit 2


@case("missing-input-folder", 2, r"InputError: input folder \S+no-such-folder does not exist - pass -i")
def _(d, an):
    return {"input": d / "no-such-folder"}


@case("empty-input-folder", 2, r"InputError: input folder \S+ is empty - put the planning CT's DICOM files in it")
def _(d, an):
    return {"input": _in(d)}


@case("only-non-dicom-files", 2,
      r"InputError: no usable DICOM file in \S+ \(4 files; e\.g\. \S+: .+\) - send the CT series as DICOM",
      warns=r"skipped 4 file\(s\) that are not readable DICOM: .*notes\.txt")
def _(d, an):
    i = _in(d)
    (i / "notes.txt").write_text("planning CT to follow\n")
    (i / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    (i / "IM0001.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    (i / "empty.dcm").write_bytes(b"")
    return {"input": i}


@case("jpeg2000-with-blank-uids", 2,
      r"InputError: no usable DICOM file in \S+ct_dicom_jpeg2000 .*empty SeriesInstanceUID or SOPInstanceUID.* - send",
      requires=("totalseg-example/ct_dicom_jpeg2000",))
def _(d, an):
    return {"input": SHARED / "totalseg-example" / "ct_dicom_jpeg2000"}


@case("one-slice-without-pixel-data", 2,
      r"InputError: \S+CT0017\.dcm has no pixel data \(truncated or header-only file\) - send the complete series")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    edit(s.paths[17], lambda ds: delattr(ds, "PixelData"))
    return {"input": d / "in"}


@case("truncated-pixel-data", 2,
      r"InputError: cannot decode pixel data of \S+CT0021\.dcm \(transfer syntax Explicit VR Little Endian: .+\) "
      r"- send")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    data = s.paths[21].read_bytes()
    s.paths[21].write_bytes(data[: len(data) - 5000])  # the file ends inside its pixel data
    return {"input": d / "in"}


@case("undecodable-transfer-syntax", 2,
      r"InputError: cannot decode pixel data of \S+CT0005\.dcm \(transfer syntax MPEG2 Main Profile / Main Level: .+\)"
      r" - send it uncompressed or in JPEG 2000")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)

    def mpeg2(ds):
        ds.compress(RLELossless)  # encapsulated frames, then labelled as a video syntax nobody decodes
        ds.file_meta.TransferSyntaxUID = MPEG2MPML

    edit(s.paths[5], mpeg2)
    return {"input": d / "in"}


@case("series-over-the-memory-budget", 2,
      r"InputError: series \S+: 1300 slices of 512x512 exceed the memory budget \(\d+ voxels\) - send the "
      r"treatment-site range only")
def _(d, an):
    # 1300 real-size headers whose pixel data is a stub: refused before any pixel is decoded.
    # One file is written by pydicom, the others are byte copies with their own UID and position.
    template = write_ct_series(np.full((1, 512, 512), -1000, np.int16), (1.0, 0.9, 0.9), d / "template")[0]
    ds = pydicom.dcmread(template)
    uid = generate_uid()[:48]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{uid}.10000"
    ds.ImagePositionPatient = ["-230.000", "-230.000", "1000.000"]
    del ds.SliceLocation, ds.InstanceNumber
    ds.PixelData = b"\0\0"
    ds.save_as(d / "template.dcm")
    data = (d / "template.dcm").read_bytes()
    i = _in(d)
    for k in range(1300):
        (i / f"CT{k:04d}.dcm").write_bytes(data.replace(f"{uid}.10000".encode(), f"{uid}.{10000 + k}".encode())
                                           .replace(b"\\1000.000", f"\\{1000 + k}.000".encode()))
    return {"input": i}


# ---- no series fit to contour: exit 3


@case("no-pixel-data-at-all", 3,
      r"SeriesSelectionError: no CT series in \S+ can be contoured \(\S+ \(CT, 40 files.*\): no pixel data in any "
      r"file\) - send an axial CT series")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    for p in s.paths:
        edit(p, lambda ds: delattr(ds, "PixelData"))
    return {"input": d / "in"}


@case("only-mr", 3, r"SeriesSelectionError: no CT series in \S+ can be contoured \(\S+ \(MR, 40 files.*modality MR, "
                    r"not CT\) - send an axial CT series of at least 10 slices")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)

    def to_mr(ds):
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage

    for p in s.paths:
        edit(p, to_mr)
    return {"input": d / "in"}


@case("only-rtstruct-rtdose-rtplan", 3,
      r"SeriesSelectionError: no CT series in \S+ can be contoured (?=.*modality RTSTRUCT)(?=.*modality RTDOSE)"
      r"(?=.*modality RTPLAN).* - send an axial CT series",
      requires=("hn-chus-052/RTDOSE", "hn-chus-052/RTPLAN", "dicompyler-rtss"))
def _(d, an):
    i = _in(d)
    for src in (SHARED / "hn-chus-052" / "RTDOSE" / "RD.dcm", SHARED / "hn-chus-052" / "RTPLAN" / "RP.dcm",
                SHARED / "dicompyler-rtss" / "rtss.dcm"):
        (i / src.name).symlink_to(src)
    return {"input": i}


@case("fewer-slices-than-the-minimum", 3,
      r"SeriesSelectionError: .*9 slices, fewer than the 10 needed for a volume\) - send an axial CT series of at "
      r"least 10 slices")
def _(d, an):
    write_series(_in(d), an.a, an.spacing, n=9, start=55)
    return {"input": d / "in"}


@case("oblique-series", 3,
      r"SeriesSelectionError: .*not axial \(slice normal \[0\.0, -0\.342, 0\.94\]\)\) - send an axial CT series")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    for p in s.paths:
        edit(p, lambda ds: rotate_slice(ds, rotation_x(20)))
    return {"input": d / "in"}


# ---- geometry: exit 4


@case("different-image-at-the-same-position", 4,
      r"GeometryError: series \S+: \S+(CT0012|other_scan)\.dcm and \S+(CT0012|other_scan)\.dcm are two different "
      r"images at the same position \(-24\.00 mm\) - remove the duplicate or send one acquisition")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    ds = pydicom.dcmread(s.paths[12])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PixelData = np.clip(an.b[52], -1024, 3071).astype(np.int16).tobytes()  # another patient's slice
    ds.save_as(d / "in" / "other_scan.dcm")
    return {"input": d / "in"}


@case("missing-slice", 4,
      r"GeometryError: series \S+: slice spacing is not uniform \(6\.000 mm between positions -3\.00 and 3\.00 mm, "
      r"median 3\.000 mm\): missing or extra slice - send the complete series")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    s.paths[20].unlink()
    return {"input": d / "in"}


@case("non-uniform-spacing", 4,
      r"GeometryError: series \S+: slice spacing is not uniform \(3\.500 mm .*\): missing or extra slice - send")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)

    def stretch(k):  # 3.0 mm steps up to slice 24, 3.5 mm after
        def fn(ds):
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, z + 0.5 * max(0, k - 24)]

        return fn

    for k, p in enumerate(s.paths):
        edit(p, stretch(k))
    return {"input": d / "in"}


@case("gantry-tilt", 4,
      r"GeometryError: series \S+: slice positions drift in-plane by up to [\d.]+ mm \(gantry tilt or sheared "
      r"stack\) - send a reconstruction without tilt")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    shear = math.tan(math.radians(15))

    def tilt(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z - ORIGIN[2]) * shear, z]

    for p in s.paths:
        edit(p, tilt)
    return {"input": d / "in"}


@case("mixed-orientations", 4,
      r"GeometryError: series \S+: slices have different orientations - send a single axial reconstruction")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    for p in s.paths[1::2]:  # every other slice tilted by 1 degree: still "axial", but not one stack
        edit(p, lambda ds: rotate_slice(ds, rotation_x(1)))
    return {"input": d / "in"}


@case("truncated-slice-leaves-a-gap", 4,
      r"GeometryError: series \S+: slice spacing is not uniform .*: missing or extra slice - send the complete series",
      warns=r"skipped 1 file\(s\) that are not readable DICOM: \S+CT0020\.dcm: no SeriesInstanceUID or SOPInstanceUID "
            r"\(truncated file")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    s.paths[20].write_bytes(s.paths[20].read_bytes()[:600])  # cut inside the header
    return {"input": d / "in"}


# ---- models: exit 5


def _models_copy(d: Path) -> list[tuple[Path, dict]]:
    """models/ as symlinks to the real weights (nothing big copied): [(folder, model.yaml), ...]."""
    out = []
    for meta in sorted(MODELS.glob("*/model.yaml")):
        dst = d / "models" / meta.parent.name
        dst.mkdir(parents=True)
        shutil.copy(meta, dst / "model.yaml")
        cfg = yaml.safe_load(meta.read_text())
        (dst / cfg["files"]["onnx"]["path"]).symlink_to(meta.parent / cfg["files"]["onnx"]["path"])
        out.append((dst, cfg))
    return out


@case("model-file-corrupt", 5)
def _(d, an):
    write_series(_in(d), an.a, an.spacing, cache=an)
    (folder, cfg), *_ = _models_copy(d)
    onnx = folder / cfg["files"]["onnx"]["path"]
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.unlink()
    onnx.write_bytes(bytes(data))
    expected = cfg["files"]["onnx"]["sha256"]
    return {"input": d / "in", "models": d / "models",
            "message": rf"ModelError: model file {re.escape(str(onnx))} is corrupt: sha256 [0-9a-f]{{64}}, "
                       rf"expected {expected} - restore models/{folder.name} from the release"}


@case("model-file-missing", 5)
def _(d, an):
    write_series(_in(d), an.a, an.spacing, cache=an)
    *_, (folder, cfg) = _models_copy(d)
    onnx = folder / cfg["files"]["onnx"]["path"]
    onnx.unlink()
    return {"input": d / "in", "models": d / "models",
            "message": rf"ModelError: model file {re.escape(str(onnx))} is missing \(expected sha256 "
                       rf"{cfg['files']['onnx']['sha256']}\) - restore models/{folder.name}"}


@case("model-folder-missing", 5, r"ModelError: model folder \S+no-models does not exist - pass -m")
def _(d, an):
    write_series(_in(d), an.a, an.spacing, cache=an)
    return {"input": d / "in", "models": d / "no-models"}


# ---- configuration: exit 8


@case("rules-file-missing", 8, r"ConfigurationError: series selection rules \S+no-rules\.yaml cannot be read "
      r"\(No such file or directory\) - pass --rules")
def _(d, an):
    write_series(_in(d), an.a, an.spacing, cache=an)
    return {"input": d / "in", "args": ["--rules", str(d / "no-rules.yaml")]}


@case("rules-file-unknown-ranking-key", 8,
      r"ConfigurationError: series selection rules \S+rules\.yaml: unknown ranking keys \['largest'\]; valid: .+ - "
      r"fix it or restore config/series_selection\.yaml")
def _(d, an):
    write_series(_in(d), an.a, an.spacing, cache=an)
    (d / "rules.yaml").write_text("ranking: [most_slices, largest]\n")
    return {"input": d / "in", "args": ["--rules", str(d / "rules.yaml")]}


# ---- output: exit 6


@case("output-path-under-a-file", 6,
      r"OutputError: output folder \S+file\.txt/out cannot be written \(.+\) - pass -o with a writable folder")
def _(d, an):
    write_series(_in(d), an.a, an.spacing, cache=an)
    (d / "file.txt").write_text("not a folder\n")
    return {"input": d / "in", "output": d / "file.txt" / "out", "watch": d / "file.txt"}


@case("output-folder-read-only", 6,
      r"OutputError: output folder \S+ cannot be written \(Permission denied\) - pass -o with a writable folder",
      root_ok=False)
def _(d, an):
    write_series(_in(d), an.a, an.spacing, cache=an)
    out = d / "out"
    out.mkdir()
    (out / SENTINEL).write_text("from before\n")
    out.chmod(0o555)
    return {"input": d / "in", "output": out}


# ---- good input: exit 0, contoured, nothing lost


@case("several-series-and-studies", 0, requires=("hn-chus-052/RTPLAN",))
def _(d, an):
    i = _in(d)
    study = generate_uid()
    frame = generate_uid()
    chosen = write_series(i / "a", an.a, an.spacing, n=40, study_uid=study, frame_uid=frame,
                          series_description="planning CT")
    # a DERIVED reconstruction of the same study with more slices, interleaved 1.5 mm apart
    write_series(i / "b", an.a, an.spacing, n=44, start=38, study_uid=study, frame_uid=frame,
                 origin_lps=(ORIGIN[0], ORIGIN[1], ORIGIN[2] - 7.5),
                 image_type=("DERIVED", "SECONDARY", "AXIAL"), series_description="derived recon")
    # an older study of the same patient, other anatomy
    write_series(i / "c", an.b, an.spacing, n=30, series_description="old CT")
    (i / "RP.dcm").symlink_to(SHARED / "hn-chus-052" / "RTPLAN" / "RP.dcm")
    return {"input": i, "chosen": chosen,
            "warns": rf"3 CT series are eligible; contouring {re.escape(chosen.uid)} .*chosen by original_primary"}


@case("scout-mixed-into-the-series", 0, warns=r"ignoring 1 localiser/scout image\(s\) mixed into the series")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    # a coronal LOCALIZER in the same series, its file sorting first
    scout = pydicom.dcmread(s.paths[0])
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.ImagePositionPatient = [ORIGIN[0], 0.0, 100.0]
    scout.PixelData = np.clip(an.a[:, 64, :][::-1][:, :], -1024, 3071).astype(np.int16).tobytes()
    scout.save_as(d / "in" / "00_scout.dcm")
    # and a scout series of its own
    write_series(d / "in" / "scouts", an.a, an.spacing, n=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    return {"input": d / "in", "chosen": s}


@case("exact-duplicate-file", 0, warns=r"CT0005\.dcm is a copy of \S+CT0005\.dcm \(same SOPInstanceUID\); using one")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    (d / "in" / "resent").mkdir()
    shutil.copy(s.paths[5], d / "in" / "resent" / "CT0005.dcm")
    return {"input": d / "in", "chosen": s}


@case("corrupt-extra-files", 0,
      warns=r"skipped 3 file\(s\) that are not readable DICOM: (?=.*CT0007_partial\.dcm)(?=.*DICOMDIR.txt)"
            r"(?=.*empty\.dcm)")
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    (d / "in" / "CT0007_partial.dcm").write_bytes(s.paths[7].read_bytes()[:700])  # an interrupted re-send
    (d / "in" / "DICOMDIR.txt").write_text("index\n")
    (d / "in" / "empty.dcm").write_bytes(b"")
    return {"input": d / "in", "chosen": s}


@case("ten-slices-the-minimum", 0)
def _(d, an):
    return {"input": d / "in", "chosen": write_series(_in(d), an.a, an.spacing, n=10, start=55)}


@case("missing-output-folder-is-created", 0)
def _(d, an):
    s = write_series(_in(d), an.a, an.spacing, cache=an)
    return {"input": d / "in", "chosen": s, "output": d / "new" / "nested" / "out", "watch": d / "new"}


# --------------------------------------------------------------------------- running the table

DRIVER = r'''
import json, logging, sys, time
sys.path.insert(0, sys.argv[1])
import app

class Grab(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, r):
        self.records.append({"level": r.levelno, "name": r.name, "message": r.getMessage()})

results = {}
for job in json.load(open(sys.argv[2])):
    grab = Grab()
    logging.getLogger().addHandler(grab)
    t0 = time.perf_counter()
    try:
        rc = app.run(job["argv"])
    except BaseException as exc:  # run() must return an exit code, never raise
        rc = f"raised {type(exc).__name__}: {exc}"
    finally:
        logging.getLogger().removeHandler(grab)
    results[job["name"]] = {"rc": rc, "records": grab.records}
    print(f"=== case {job['name']}: rc {rc} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    json.dump(results, open(sys.argv[3], "w"))
'''


def needs_models() -> None:
    if not list(MODELS.glob("*/model.yaml")):
        pytest.skip(f"no trained model in {MODELS} (models/*/model.yaml) yet - the app cannot start without one")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file and folder under ``folder`` (relative path -> content; folders -> b'<dir>')."""
    if not folder.exists():
        return {}
    if folder.is_file():
        return {".": folder.read_bytes()}
    return {str(p.relative_to(folder)): (b"<dir>" if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def _probe(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd + ["true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class Batch:
    specs: dict[str, dict]
    before: dict[str, dict]
    results: dict[str, dict]
    stderr: str
    isolation: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, anatomy) -> Batch:
    needs_models()
    root = tmp_path_factory.mktemp("bad-input")
    t0 = time.perf_counter()
    specs, before, jobs = {}, {}, []
    for c in CASES:
        if any(not (SHARED / r).exists() for r in c.requires) or (IS_ROOT and not c.root_ok):
            continue
        d = root / c.name
        d.mkdir()
        spec = c.build(d, anatomy)
        spec.setdefault("models", MODELS)
        if "output" not in spec:
            spec["output"] = d / "out"
            spec["output"].mkdir(exist_ok=True)
            (spec["output"] / SENTINEL).write_text("from before\n")
        spec.setdefault("watch", spec["output"])
        specs[c.name] = spec
        before[c.name] = snapshot(spec["watch"])
        jobs.append({"name": c.name, "argv": ["-i", str(spec["input"]), "-o", str(spec["output"]),
                                              "-m", str(spec["models"]), *spec.get("args", [])]})
    (root / "jobs.json").write_text(json.dumps(jobs))
    print(f"built {len(jobs)} cases in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    (root / "driver.py").write_text(DRIVER)
    # an empty HOME, TMPDIR and working directory that must stay empty; no network
    iso = {k: root / k for k in ("home", "tmpdir", "cwd")}
    for p in iso.values():
        p.mkdir()
    prefix = []
    isolation = {"dirs": iso, "unshare": False, "strace_log": None}
    if IS_ROOT and shutil.which("unshare") and _probe(["unshare", "-n"]):
        prefix += ["unshare", "-n"]
        isolation["unshare"] = True
    if shutil.which("strace") and _probe(["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o",
                                          os.devnull]):
        isolation["strace_log"] = root / "connect.strace"
        prefix += ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=connect", "-o", str(isolation["strace_log"])]
    cmd = prefix + [sys.executable, str(root / "driver.py"), str(ROOT), str(root / "jobs.json"),
                    str(root / "results.json")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOLOSCAN_", "ORT_", "CUPY_"))}
    env.update(HOME=str(iso["home"]), TMPDIR=str(iso["tmpdir"]), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(["bash", "-c", 'ulimit -s 32768 2>/dev/null; exec "$@"', "bash", *cmd],
                          capture_output=True, text=True, timeout=900, env=env, cwd=iso["cwd"])
    sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines() if line.startswith("=== case")))
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").exists() else {}
    assert proc.returncode == 0 and len(results) == len(jobs), proc.stderr[-5000:]
    return Batch(specs, before, results, proc.stderr, isolation)


def _referenced(ds, depth: int = 0, out=None) -> dict[str, set[str]]:
    """UIDs referenced inside nested sequences (not the object's own)."""
    out = out if out is not None else {"ReferencedSOPInstanceUID": set(), "SeriesInstanceUID": set()}
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _referenced(item, depth + 1, out)
        elif depth and elem.keyword in out:
            out[elem.keyword].add(str(elem.value))
    return out


def _log(res: dict) -> str:
    return "\n".join(f"{logging.getLevelName(r['level'])} {r['name']}: {r['message']}" for r in res["records"])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(batch, case):
    if case.name not in batch.specs:
        pytest.skip("runs as root, where a read-only folder does not stop writes" if not case.root_ok
                    else f"needs {', '.join(case.requires)} under {SHARED}")
    spec, res = batch.specs[case.name], batch.results[case.name]
    log = _log(res)
    assert res["rc"] == case.rc, log[-4000:]
    errors = [r for r in res["records"] if r["level"] >= logging.ERROR]
    warns = spec.get("warns", case.warns)
    if warns:
        assert any(re.search(warns, r["message"]) for r in res["records"] if r["level"] == logging.WARNING), log
    after = snapshot(spec["watch"])
    assert not [p for p in after if STAGING_PREFIX in p], f"staging folder left: {sorted(after)}"
    if case.rc:
        assert len(errors) == 1, f"want one ERROR line, got:\n{log}"
        err = errors[0]
        assert err["name"] == "hn-autocontour"
        cls = err["message"].split(":", 1)[0]
        assert EXIT_CODES.get(cls) == case.rc, err["message"]
        assert "\n" not in err["message"] and re.search(r" - [a-z]", err["message"]), err["message"]  # says what to do
        assert re.search(spec.get("message", case.message), err["message"]), err["message"]
        assert after == batch.before[case.name], "OUTPUT changed by a failed run"
        return
    # good input: contoured, the chosen series only
    assert not errors, log
    out, chosen = Path(spec["output"]), spec["chosen"]
    new = {p.name for p in out.iterdir()} - {SENTINEL}
    assert new == {f"{chosen.uid}_SEG.dcm", f"{chosen.uid}_RTSTRUCT.dcm", f"{chosen.uid}_QA_1.dcm", "qa",
                   "report.json"}, sorted(new)
    assert {p.name for p in (out / "qa").iterdir()} == {"qa_sheet.png"}
    if SENTINEL in batch.before[case.name]:  # what the user had in OUTPUT is still there
        assert (out / SENTINEL).read_text() == "from before\n"
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["chosen"] == chosen.uid
    assert report["input"]["shape_kji"][0] == len(chosen.sops)
    seg = pydicom.dcmread(out / f"{chosen.uid}_SEG.dcm")
    rts = pydicom.dcmread(out / f"{chosen.uid}_RTSTRUCT.dcm")
    qa = pydicom.dcmread(out / f"{chosen.uid}_QA_1.dcm", stop_before_pixels=True)
    study_uid = str(pydicom.dcmread(chosen.paths[0], stop_before_pixels=True).StudyInstanceUID)
    for ds in (seg, rts, qa):
        refs = _referenced(ds)
        assert refs["SeriesInstanceUID"] == {chosen.uid}, refs["SeriesInstanceUID"]
        assert refs["ReferencedSOPInstanceUID"] - {study_uid} <= chosen.sops
        assert ds.StudyInstanceUID == study_uid
    contour_images = rts.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0].ContourImageSequence
    assert {str(i.ReferencedSOPInstanceUID) for i in contour_images} == chosen.sops


@pytest.mark.slow
def test_app_needs_no_network_and_writes_only_to_output(batch):
    """HOME, TMPDIR and the working directory stay empty through every row of the table;
    the rows ran in a network namespace without interfaces (root) and no socket connect()
    to an IP address was attempted (strace)."""
    iso = batch.isolation
    for name, folder in iso["dirs"].items():
        left = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
        assert not left, f"the app wrote into {name} ({folder}): {left}"
    if iso["strace_log"] is not None:
        attempts = [line for line in Path(iso["strace_log"]).read_text().splitlines() if "AF_INET" in line]
        assert not attempts, "network connections attempted:\n" + "\n".join(attempts[:10])
    if not (iso["unshare"] or iso["strace_log"]):
        pytest.skip("neither unshare -n (needs root) nor strace available: only the folders were checked")


@pytest.mark.slow
def test_cli_exit_code_and_one_error_line(tmp_path, anatomy):
    """``python app.py`` itself: the process exit code, and the app's verdict as its last stderr line
    (Holoscan prints its own ``[error]`` lines for an exception raised inside an operator before it)."""
    needs_models()
    s = write_series(tmp_path / "in", anatomy.a, anatomy.spacing, cache=anatomy)
    s.paths[20].unlink()
    out = tmp_path / "out"
    cmd = (f"ulimit -s 32768 2>/dev/null; exec {sys.executable} {ROOT / 'app.py'} -i {tmp_path / 'in'} -o {out} "
           f"-m {MODELS}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == EXIT_CODES["GeometryError"] == 4, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    app_errors = [line for line in lines if " ERROR hn-autocontour: " in line]
    assert len(app_errors) == 1 and lines[-1] == app_errors[0], "\n".join(lines[-15:])
    assert s.uid in app_errors[0] and "send the complete series" in app_errors[0]
    assert out.is_dir() and not any(out.iterdir())


# --------------------------------------------------------------------------- in-process (no models needed)


def _load(folder: Path, threads: int = 2):
    cands, _ = scan_folder(folder)
    return build_volume(select_series(cands, SelectionRules(), folder), threads=threads)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian],
                         ids=["rle", "jpeg-ls", "jpeg2000", "deflate"])
def test_compressed_series_decode_to_the_same_hu(tmp_path, anatomy, syntax):
    plain = write_series(tmp_path / "plain", anatomy.a, anatomy.spacing, n=12, start=50, cache=anatomy)
    packed = tmp_path / "packed"
    packed.mkdir()
    for p in plain.paths:
        ds = pydicom.dcmread(p)
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax  # the whole dataset is deflated on write
        else:
            ds.compress(syntax)
        ds.save_as(packed / p.name)
    assert str(pydicom.dcmread(packed / plain.paths[0].name).file_meta.TransferSyntaxUID) == syntax
    a, b = _load(tmp_path / "plain"), _load(packed)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)
    assert a.array.min() < -900 and a.array.max() > 500  # real anatomy: air and bone


def test_memory_budget_is_checked_before_any_pixel_is_decoded(tmp_path, anatomy, monkeypatch):
    s = write_series(tmp_path, anatomy.a, anatomy.spacing, n=12, start=50, cache=anatomy)
    monkeypatch.setattr(ct_volume, "MAX_VOXELS", 11 * 128 * 128)
    for p in s.paths:  # no pixel would decode: the refusal must come first
        edit(p, lambda ds: setattr(ds, "PixelData", b"\0\0"))
    with pytest.raises(InputError, match=r"12 slices of 128x128 exceed the memory budget \(180224 voxels\) - send"):
        _load(tmp_path)


# Loader fixes found by tests/test_fuzz_dicom.py and the table above, each pinned here.


def _ipp(k_of: Callable[[int, list[float]], list[float]]):
    def mutate(paths):
        for k, p in enumerate(paths):
            edit(p, lambda ds, k=k: setattr(ds, "ImagePositionPatient",
                                            [f"{v:.4f}" for v in k_of(k, [float(v) for v in ds.ImagePositionPatient])]))
    return mutate


def _raw(keyword: str, value: bytes, index: int | None = 3):
    """Write ``value`` as the raw bytes of ``keyword`` in one file (or in all: index None)."""
    def mutate(paths):
        for p in paths if index is None else [paths[index]]:
            ds = pydicom.dcmread(p)
            tag = ds.data_element(keyword).tag
            vr = ds.data_element(keyword).VR
            ds._dict[tag] = pydicom.dataelem.RawDataElement(tag, vr, len(value), value, 0, False, True)
            ds.save_as(p)
    return mutate


def _cut_inside_pixel_data_length(paths, index: int = 4):
    data = paths[index].read_bytes()
    at = data.index(b"\xe0\x7f\x10\x00OW") + 10  # tag, VR, 2 reserved bytes, then half the 4-byte length
    paths[index].write_bytes(data[:at])


def _multi_frame(paths):
    for p in paths:  # every file: two 64-row frames instead of one 128-row image
        edit(p, lambda ds: (setattr(ds, "Rows", 64), setattr(ds, "NumberOfFrames", 2)))


def _scout_first(paths):
    scout = pydicom.dcmread(paths[0])
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.save_as(paths[0].parent / "00_scout.dcm")


@pytest.mark.parametrize(
    "mutate, outcome",
    [
        # header cut where pydicom raises struct.error (crashed scan_folder): the file is skipped, the gap refused
        (_cut_inside_pixel_data_length, (GeometryError, r"slice spacing is not uniform")),
        # a damaged DS value in the first file crashed select_series' axial check with ValueError: now that file
        # is skipped as damaged (it was the lowest slice, so 11 slices remain, without a gap)
        (_raw("ImageOrientationPatient", b"1\\0\\0\\0\\abc\\0 ", index=0), 11),
        # NaN / inf positions or spacings passed every "> tolerance" test and gave a NaN affine
        (_raw("ImagePositionPatient", b"nan\\0\\0 "), (GeometryError, r"non-finite ImageOrientationPatient")),
        (_raw("PixelSpacing", b"nan\\nan ", index=None), (GeometryError, r"non-finite")),
        # a huge RescaleSlope overflowed float32 into inf / NaN HU
        (_raw("RescaleSlope", b"1e308 "), (InputError, r"RescaleSlope 1e\+308 .* beyond float range - re-export")),
        (_raw("RescaleSlope", b"0 "), (InputError, r"RescaleSlope .* is not a usable number")),
        # multi-frame slices failed to broadcast into the volume with a bare ValueError
        (_multi_frame, (InputError, r"has shape \(2, 64, 128\), not one 64x128 greyscale frame - send")),
        # position jitter within the 1 % tolerance is still accepted
        (_ipp(lambda k, p: [p[0], p[1], p[2] + (0.005 if k % 2 else -0.005)]), None),
        # a scout whose file sorts first made the whole series "not axial"
        (_scout_first, None),
    ],
    ids=["struct-error-truncation", "garbage-ds-value", "nan-position", "nan-spacing", "slope-overflow",
         "slope-zero", "multi-frame", "jitter-accepted", "scout-sorted-first"],
)
def test_loader_fixes(tmp_path, anatomy, mutate, outcome):
    s = write_series(tmp_path, anatomy.a, anatomy.spacing, n=12, start=50, cache=anatomy)
    mutate(s.paths)
    if outcome is None or isinstance(outcome, int):
        vol = _load(tmp_path)
        assert vol.array.shape == (outcome or 12, 128, 128) and vol.series_instance_uid == s.uid
        assert set(vol.sop_instance_uids) <= s.sops
        return
    error, message = outcome
    with pytest.raises(error, match=message) as info:
        _load(tmp_path)
    assert "\n" not in str(info.value)


def test_slice_spacing_may_not_drift(tmp_path, anatomy):
    """Steps of 2.986 mm then 3.014 mm each pass the 1 % step test, but add up: with the median
    step the affine put the top slice 0.53 mm (18 % of a slice) away from its own position.
    The slices must now lie on the mean-step grid (within 1 % of a step)."""
    s = write_series(tmp_path, anatomy.a, anatomy.spacing, n=40, cache=anatomy)
    z = np.concatenate([[0.0], np.cumsum([2.986] * 20 + [3.014] * 19)])
    for k, p in enumerate(s.paths):
        edit(p, lambda ds, k=k: setattr(ds, "ImagePositionPatient", [ORIGIN[0], ORIGIN[1], f"{ORIGIN[2] + z[k]:.4f}"]))
    with pytest.raises(GeometryError, match=r"CT0020\.dcm lies 0\.27\d mm off a regular 3\.000 mm grid \(slice "
                                            r"spacing drifts\) - send a reconstruction with uniform spacing"):
        _load(tmp_path)
