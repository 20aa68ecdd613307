"""Property-based: damaged DICOM headers never crash the loader, and a volume, when one is
built, sits exactly where its headers say.

Random mutations (deleted or garbage header values, shifted / rotated / rescaled slices,
copied / removed / truncated / bit-flipped files, wrong transfer syntaxes) are applied to
two small real series: 12 slices of an OpenKBP patient written by ``write_ct_series`` and
12 slices of the hn-chus-052 planning CT.  ``scan_folder`` -> ``select_series`` ->
``build_volume`` may only raise ``AutoContourError`` subclasses (with a one-line
message); whenever a ``Volume`` comes out, its affine must reproduce every sorted slice's
ImagePositionPatient, its ImageOrientationPatient and PixelSpacing.

``FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_dicom.py`` explores more (and randomly);
the default is 60 derandomised examples per source (< 60 s), so CI is reproducible.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword

from autocontour.ct_volume import SPACING_RELATIVE_TOLERANCE, build_volume
from autocontour.errors import AutoContourError
from autocontour.series_selection import SelectionRules, scan_folder, select_series
from tools.openkbp_to_dicom import write_ct_series

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
N_SLICES = 12
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="FUZZ_EXAMPLES" not in os.environ,
    database=None,  # no example database (hypothesis keeps only its self-ignored .hypothesis/ cache)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

KEYWORDS = [
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns", "SeriesInstanceUID",
    "SOPInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "Modality", "SOPClassUID", "ImageType",
    "RescaleSlope", "RescaleIntercept", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation", "SliceThickness", "SeriesDate", "SeriesTime",
    "SeriesDescription", "NumberOfFrames", "PixelData", "InstanceNumber", "SliceLocation",
]
INTERESTING = [
    b"", b"nan", b"inf", b"-inf", b"1e308", b"-1e308", b"abc", b"0", b"-1", b"1", b"3", b"65535", b"1\\2",
    b"0\\0", b"-1\\1", b"0\\0\\0\\0\\0\\0", b"1\\0\\0\\0\\1\\0", b"1\\0\\0\\0\\0\\-1", b"0\\1\\0\\0\\0\\-1",
    b"1\\0\\0\\0\\1\\0\\0", b"nan\\0\\0\\0\\1\\0", b"1e-9\\1e-9", b"1\\2\\3", b"1\\2\\3\\4", b"0\\0\\1e9",
    b"\x00\x00", b"\xff\xff", b"\x01\x00", b"\x00\x01\x00\x00", b"CT", b"MR", b"LOCALIZER",
    b"ORIGINAL\\PRIMARY\\LOCALIZER", b"1.2.840.10008.5.1.4.1.1.2", b"1.2.3", b"\xc3\x28", b" " * 64,
]
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.100", "1.2.3.4", "",
]


# ---------------------------------------------------------------------------- sources


def _sorted_by_z(paths):
    return sorted(paths, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> [(file name, bytes)] of each base series."""
    out = {}
    npz = SHARED / "openkbp" / "validation" / "pt_201.npz"
    if npz.is_file():
        from training.data import load_openkbp

        case = load_openkbp(npz)
        folder = tmp_path_factory.mktemp("fuzz-openkbp")
        # 12 slices through the parotids, a 64 x 64 crop of real anatomy
        write_ct_series(case.ct[50:50 + N_SLICES, 24:88, 24:88], case.spacing_zyx, folder,
                        origin_lps=(-173.5, -173.5, -60.0), seed=1)
        out["openkbp"] = [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())]
    chus = SHARED / "hn-chus-052" / "CT"
    if chus.is_dir():
        files = _sorted_by_z(list(chus.iterdir()))[60:60 + N_SLICES]
        out["chus"] = [(p.name, p.read_bytes()) for p in files]
    return out


# ---------------------------------------------------------------------------- mutations

file_index = st.integers(0, N_SLICES + 1)  # may point past the end: wraps around
keyword = st.sampled_from(KEYWORDS)
raw_value = st.one_of(st.sampled_from(INTERESTING), st.binary(max_size=24))
small = st.floats(-0.2, 0.2, allow_nan=False)
tiny = st.floats(-0.04, 0.04, allow_nan=False)  # around the 1 % spacing tolerance
large = st.floats(-50, 50, allow_nan=False)

mutation = st.one_of(
    st.tuples(st.just("delete"), file_index, keyword),
    st.tuples(st.just("delete_all"), keyword),
    st.tuples(st.just("raw"), file_index, keyword, raw_value),
    st.tuples(st.just("raw_all"), keyword, raw_value),
    st.tuples(st.just("shift"), file_index, st.tuples(small, small, small)),
    st.tuples(st.just("shift"), file_index, st.tuples(large, large, large)),
    st.tuples(st.just("drift"), st.tuples(small, small, small)),  # every slice i moved by i * delta
    st.tuples(st.just("jitter"), st.lists(st.tuples(tiny, tiny, tiny), min_size=N_SLICES, max_size=N_SLICES)),
    st.tuples(st.just("rotate"), st.one_of(file_index, st.none()), st.floats(-0.5, 0.5, allow_nan=False)),
    st.tuples(st.just("spacing"), st.one_of(file_index, st.none()), st.floats(0.5, 2.0, allow_nan=False)),
    st.tuples(st.just("copy"), file_index, st.booleans()),
    st.tuples(st.just("remove"), file_index),
    st.tuples(st.just("truncate"), file_index, st.floats(0.0, 1.0)),
    st.tuples(st.just("flip"), file_index, st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)),
                                                    min_size=1, max_size=6)),
    st.tuples(st.just("transfer_syntax"), file_index, st.sampled_from(TRANSFER_SYNTAXES)),
)


def _set_raw(ds, kw: str, value: bytes) -> None:
    tag = tag_for_keyword(kw)
    vr = dictionary_VR(tag)
    vr = "OB" if "or" in vr else vr  # "OB or OW" etc.
    if len(value) % 2:
        value += b" " if vr not in ("OB", "OW", "US", "SS", "UL", "SL", "FL", "FD") else b"\0"
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def _rotate(ds, angle_deg: float) -> None:
    a = np.deg2rad(angle_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (iop @ rot.T).ravel()]


def apply(files: list[tuple[str, bytes]], mutations, folder: Path) -> None:
    """Write the mutated series into ``folder``."""
    datasets = [[name, pydicom.dcmread(pydicom.filebase.DicomBytesIO(data)), None] for name, data in files]
    byte_ops = []

    def at(i):
        return datasets[i % len(datasets)] if datasets else None

    for m in mutations:
        kind = m[0]
        if kind in ("truncate", "flip"):
            byte_ops.append(m)
            continue
        try:
            if kind == "delete":
                entry = at(m[1])
                if entry and m[2] in entry[1]:
                    delattr(entry[1], m[2])
            elif kind == "delete_all":
                for _, ds, _ in datasets:
                    if m[1] in ds:
                        delattr(ds, m[1])
            elif kind == "raw":
                entry = at(m[1])
                if entry:
                    _set_raw(entry[1], m[2], m[3])
            elif kind == "raw_all":
                for _, ds, _ in datasets:
                    _set_raw(ds, m[1], m[2])
            elif kind == "shift":
                ds = at(m[1])[1] if datasets else None
                if ds is not None:
                    ipp = [float(v) for v in ds.ImagePositionPatient]
                    ds.ImagePositionPatient = [f"{v + d:.6f}" for v, d in zip(ipp, m[2])]
            elif kind == "drift":
                for i, (_, ds, _) in enumerate(datasets):
                    ipp = [float(v) for v in ds.ImagePositionPatient]
                    k = float(ds.InstanceNumber)
                    ds.ImagePositionPatient = [f"{v + k * d:.6f}" for v, d in zip(ipp, m[1])]
            elif kind == "jitter":
                for (_, ds, _), delta in zip(datasets, m[1]):
                    ipp = [float(v) for v in ds.ImagePositionPatient]
                    ds.ImagePositionPatient = [f"{v + d:.6f}" for v, d in zip(ipp, delta)]
            elif kind == "rotate":
                targets = [at(m[1])] if m[1] is not None else datasets
                for entry in targets:
                    if entry:
                        _rotate(entry[1], m[2])
            elif kind == "spacing":
                targets = [at(m[1])] if m[1] is not None else datasets
                for entry in targets:
                    if entry:
                        entry[1].PixelSpacing = [f"{float(v) * m[2]:.6f}" for v in entry[1].PixelSpacing]
            elif kind == "copy":
                entry = at(m[1])
                if entry:
                    copy = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(entry[1])))
                    if m[2]:
                        copy.SOPInstanceUID = pydicom.uid.generate_uid()
                    datasets.append(["copy_" + entry[0], copy, None])
            elif kind == "remove":
                if datasets:
                    datasets.pop(m[1] % len(datasets))
            elif kind == "transfer_syntax":
                entry = at(m[1])
                if entry:
                    entry[1].file_meta.TransferSyntaxUID = m[2]
        except (AttributeError, TypeError, ValueError, KeyError, IndexError, OverflowError):
            pass  # a mutation that cannot apply to an already damaged header: skip it
    blobs = {}
    for name, ds, _ in datasets:
        try:
            blobs[name] = _to_bytes(ds)
        except Exception:  # noqa: BLE001 - an unwritable mutation: write what the file held before
            blobs[name] = dict(files).get(name, b"")
    for m in byte_ops:
        if not blobs:
            break
        name = sorted(blobs)[m[1] % len(blobs)]
        data = bytearray(blobs[name])
        if m[0] == "truncate":
            data = data[: int(len(data) * m[2])]
        else:
            for frac, byte in m[2]:
                if data:
                    data[min(int(frac * len(data)), len(data) - 1)] = byte
        blobs[name] = bytes(data)
    for name, data in blobs.items():
        (folder / name).write_bytes(data)


def _to_bytes(ds) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    ds.save_as(buf)
    return buf.getvalue()


# ---------------------------------------------------------------------------- the property


def check_geometry(vol) -> None:
    """The affine reproduces the sorted slices' own headers."""
    sorted_ds = vol.datasets
    n = len(sorted_ds)
    first = sorted_ds[0]
    assert vol.array.shape == (n, int(first.Rows), int(first.Columns))
    assert np.isfinite(vol.affine).all() and np.isfinite(vol.array).all()
    assert {str(d.SeriesInstanceUID) for d in sorted_ds} == {vol.series_instance_uid}  # never two series
    assert len({str(d.SOPInstanceUID) for d in sorted_ds}) == n
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in sorted_ds])
    for d in sorted_ds:
        np.testing.assert_allclose([float(v) for v in d.ImageOrientationPatient],
                                   [float(v) for v in first.ImageOrientationPatient], atol=1e-4)
        np.testing.assert_allclose([float(v) for v in d.PixelSpacing], [float(v) for v in first.PixelSpacing],
                                   atol=1e-4)
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    a = vol.affine
    np.testing.assert_allclose(a[:3, 2], iop[:3] * col_spacing, atol=1e-3)  # along a row
    np.testing.assert_allclose(a[:3, 1], iop[3:] * row_spacing, atol=1e-3)  # down a column
    normal = np.cross(iop[:3], iop[3:])
    step = float(np.linalg.norm(a[:3, 0]))
    np.testing.assert_allclose(a[:3, 0] / step, normal, atol=1e-3)
    np.testing.assert_allclose(a[:3, 3], ipp[0], atol=1e-6)
    assert (np.diff(ipp @ normal) > 0).all(), "slices not sorted along the normal"
    predicted = a[:3, 3] + np.arange(n)[:, None] * a[:3, 0]
    # each slice where its IPP says, within the tolerances build_volume documents
    tol = SPACING_RELATIVE_TOLERANCE * step + 0.05 * min(row_spacing, col_spacing) + 2e-3
    err = np.abs(predicted - ipp).max()
    assert err <= tol, f"slice positions off the affine by {err:.4f} mm (tolerance {tol:.4f})"


def load_or_refuse(folder: Path):
    try:
        cands, _ = scan_folder(folder)
        return build_volume(select_series(cands, SelectionRules(), folder), threads=1)
    except AutoContourError as exc:
        event(type(exc).__name__)
        message = str(exc)
        assert message and "\n" not in message, f"{type(exc).__name__} message is not one line: {message!r}"
        return None


def _fuzz(files, mutations):
    with tempfile.TemporaryDirectory(prefix="fuzz-dicom-") as tmp:
        apply(files, mutations, Path(tmp))
        vol = load_or_refuse(Path(tmp))
        if vol is not None:
            event("volume built")
            check_geometry(vol)


@pytest.mark.parametrize("source", ["openkbp", "chus"])
def test_unmutated_sources_load(sources, source):
    if source not in sources:
        pytest.skip(f"{source} data not present under {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        apply(sources[source], [], Path(tmp))
        vol = load_or_refuse(Path(tmp))
    assert vol is not None and vol.array.shape[0] == N_SLICES
    check_geometry(vol)


@pytest.mark.parametrize("source", ["openkbp", "chus"])
@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_headers_raise_only_domain_errors_and_volumes_are_placed_right(sources, source, mutations):
    if source not in sources:
        pytest.skip(f"{source} data not present under {SHARED}")
    _fuzz(sources[source], mutations)
