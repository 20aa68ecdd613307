"""DICOM series -> Volume: sorting, spacing, orientation, physical positions, refusals."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from autocontour.ct_volume import build_volume
from autocontour.errors import GeometryError, InputError, SeriesSelectionError
from autocontour.series_selection import SelectionRules, scan_folder, select_series
from autocontour.volume import to_canonical
from tools.openkbp_to_dicom import ORIENTATIONS, write_ct_series

SPACING = (2.5, 0.8, 1.1)  # (z, y, x): non-square pixels on purpose
ORIGIN = (-20.0, 30.0, -100.0)


def phantom(shape=(12, 12, 14)) -> np.ndarray:
    """A canonical CT with a unique value per voxel (within the writer's HU range), so any
    mix-up of axes shows."""
    z, y, x = np.indices(shape)
    return (z * 200 + y * 15 + x - 1000).astype(np.float32)


def load(folder):
    cands, _ = scan_folder(folder)
    return build_volume(select_series(cands, SelectionRules()))


@pytest.mark.parametrize("position", sorted(ORIENTATIONS))
@pytest.mark.parametrize("descending", [False, True])
def test_every_voxel_lands_at_its_physical_position(tmp_path, position, descending):
    ct = phantom()
    write_ct_series(ct, SPACING, tmp_path, origin_lps=ORIGIN, position=position, slices_descending=descending,
                    shuffle_files=True, scramble_instance_numbers=True, seed=3)
    vol = load(tmp_path)
    # each voxel's value encodes its canonical index; its LPS position must match the phantom's
    kji = np.argwhere(np.ones(vol.array.shape, bool))[::97]
    values = vol.array[tuple(kji.T)]
    z, rest = np.divmod(values + 1000, 200)
    y, x = np.divmod(rest, 15)
    expected = np.stack([ORIGIN[0] + x * SPACING[2], ORIGIN[1] + y * SPACING[1], ORIGIN[2] + z * SPACING[0]], 1)
    np.testing.assert_allclose(vol.index_to_lps(kji), expected, atol=1e-3)
    # and the canonical view is the phantom itself
    view = to_canonical(vol)
    np.testing.assert_array_equal(view.forward(vol.array), ct)
    np.testing.assert_allclose(view.spacing_zyx, SPACING)
    np.testing.assert_allclose(view.origin_lps, ORIGIN, atol=1e-3)
    np.testing.assert_array_equal(view.inverse(view.forward(vol.array)), vol.array)


def test_rescale_slope_and_intercept_applied_per_slice(tmp_path):
    write_ct_series(phantom(), SPACING, tmp_path, origin_lps=ORIGIN)
    first = sorted(tmp_path.iterdir())[0]
    ds = pydicom.dcmread(first)
    raw = ds.pixel_array.copy()
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-1024"
    ds.save_as(first)
    vol = load(tmp_path)
    k = vol.sop_instance_uids.index(ds.SOPInstanceUID)
    np.testing.assert_array_equal(vol.array[k], raw.astype(np.float32) * 2 - 1024)


def _drop(folder, index):
    files = sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    files[index].unlink()
    return files[index]


@pytest.mark.parametrize(
    "mutate, error, message",
    [
        (lambda d: _drop(d, 5), GeometryError, "not uniform"),
        (lambda d: _tilt(d), GeometryError, "drift in-plane"),
        (lambda d: _duplicate_position(d), GeometryError, "same position"),
        (lambda d: _mixed_orientation(d), GeometryError, "different orientations"),
        (lambda d: _corrupt_pixels(d), InputError, "cannot decode"),
    ],
    ids=["missing-slice", "gantry-tilt", "duplicate-position", "mixed-orientation", "corrupt-pixels"],
)
def test_bad_geometry_is_refused_with_the_reason(tmp_path, mutate, error, message):
    write_ct_series(phantom(), SPACING, tmp_path, origin_lps=ORIGIN)
    mutate(tmp_path)
    with pytest.raises(error, match=message):
        load(tmp_path)


def _files(d):
    return sorted(d.iterdir())


def _tilt(d):
    for n, p in enumerate(_files(d)):
        ds = pydicom.dcmread(p)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.3 * float(ds.InstanceNumber), ipp[2]]
        ds.save_as(p)


def _duplicate_position(d):
    src = pydicom.dcmread(_files(d)[3])
    src.SOPInstanceUID = pydicom.uid.generate_uid()
    src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
    src.save_as(d / "dup.dcm")


def _mixed_orientation(d):
    p = _files(d)[2]
    ds = pydicom.dcmread(p)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.99, 0.141]
    ds.save_as(p)


def _corrupt_pixels(d):
    p = _files(d)[4]
    ds = pydicom.dcmread(p)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(p)


def test_exact_duplicate_file_is_used_once(tmp_path):
    write_ct_series(phantom(), SPACING, tmp_path, origin_lps=ORIGIN)
    (tmp_path / "copy.dcm").write_bytes(_files(tmp_path)[0].read_bytes())
    assert load(tmp_path).array.shape[0] == 12


def test_real_planning_ct_geometry(shared_data):
    vol = load(shared_data / "hn-chus-052" / "CT")
    assert vol.array.shape == (132, 512, 512)
    np.testing.assert_allclose(vol.spacing, [3.0, 1.171875, 1.171875], atol=1e-4)
    # the first sorted slice is the most inferior one and its IPP is the affine's origin
    positions = sorted(float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
                       for p in (shared_data / "hn-chus-052" / "CT").iterdir())
    assert vol.affine[2, 3] == pytest.approx(positions[0])
    assert vol.index_to_lps([[131, 0, 0]])[0, 2] == pytest.approx(positions[-1])
    assert -1100 < vol.array.min() < -900 and vol.array.max() > 1000  # HU, rescaled


def test_jpeg2000_series_is_decoded(shared_data, tmp_path):
    """The TotalSegmentator sample (JPEG 2000 lossless) decodes; its UIDs were blanked by
    anonymisation, so the app refuses it as is, naming the reason."""
    src = shared_data / "totalseg-example" / "ct_dicom_jpeg2000"
    with pytest.raises(InputError, match="empty SeriesInstanceUID"):
        scan_folder(src)
    series_uid = pydicom.uid.generate_uid()
    for p in sorted(src.iterdir()):
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = ds.StudyInstanceUID or series_uid + ".1"
        ds.save_as(tmp_path / p.name)
    vol = load(tmp_path)
    assert vol.array.shape == (20, 512, 512)
    assert str(pydicom.dcmread(next(tmp_path.iterdir())).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"
    assert vol.array.min() < -900 and vol.array.max() > 500


def test_no_ct_series_is_refused(tmp_path):
    write_ct_series(phantom(), SPACING, tmp_path, origin_lps=ORIGIN)
    for p in _files(tmp_path):
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)
    with pytest.raises(SeriesSelectionError, match="modality MR"):
        load(tmp_path)
