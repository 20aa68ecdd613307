"""Raw (pre-encoded) data elements: the same values pydicom would write and read back."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pydicom.sequence import Sequence as DicomSequence

from autocontour.dicom_elements import (
    encode_item, encode_sequence, encode_text, encode_uint, format_contour_data, format_ds, format_ds_array,
    put_sequence, put_text,
    put_uint, write_dataset,
)


def _round_trip(ds: Dataset) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def test_format_ds_array_equals_format_ds_value_by_value() -> None:
    rng = np.random.default_rng(3)
    values = np.concatenate([
        rng.uniform(-600, 600, 20000),
        np.round(rng.uniform(-600, 600, 2000), 4),  # exact ties at the 4th decimal
        [0.0, -0.0, -0.0001, -0.0004999, -0.0005, -0.0006, 0.0005, 0.0015, 2.0005, -2.0005, 1e10, -1e10],
    ])
    assert format_ds_array(values) == [format_ds(v) for v in values]


def test_format_ds_array_has_no_negative_zero_and_fits_16_chars() -> None:
    out = format_ds_array(np.array([-0.0, -1e-9, -0.00049, 99999999999.0 - 1]))
    assert out[:3] == ["0.000"] * 3
    assert all(len(t) <= 16 for t in out)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e11])
def test_format_ds_array_refuses_what_ds_cannot_hold(bad) -> None:
    with pytest.raises(ValueError):
        format_ds_array(np.array([1.0, bad]))
    with pytest.raises(ValueError):
        format_contour_data(np.array([[1.0, bad]]), "0")


def test_contour_data_is_each_points_x_y_and_the_slices_own_z_text() -> None:
    rng = np.random.default_rng(5)
    xy = np.concatenate([rng.uniform(-600, 600, (500, 2)), [[-0.0004, 0.0], [-0.0005, 2.0005], [1e10, -1e10]]])
    xs, ys = format_ds_array(xy[:, 0]), format_ds_array(xy[:, 1])
    expected = "\\".join(f"{x}\\{y}\\-12.5" for x, y in zip(xs, ys))
    assert format_contour_data(xy, "-12.5") == expected
    assert format_contour_data(xy[:1], "3%") == f"{xs[0]}\\{ys[0]}\\3%"  # the z text is copied, never formatted
    assert format_contour_data(np.zeros((0, 2)), "0") == ""


@pytest.mark.parametrize(
    "keyword, vr, value, expected",
    [
        ("ReferencedSOPInstanceUID", "UI", "1.2.3.45", "1.2.3.45"),  # odd length: NUL padded
        ("ReferencedSOPInstanceUID", "UI", "1.2.3.4", "1.2.3.4"),
        ("ContourGeometricType", "CS", "CLOSED_PLANAR", "CLOSED_PLANAR"),
        ("NumberOfContourPoints", "IS", "123", 123),
        ("ImagePositionPatient", "DS", ["-300", "-230.5", "12"], [-300.0, -230.5, 12.0]),
    ],
)
def test_put_text_reads_back_as_the_value(keyword, vr, value, expected) -> None:
    ds = Dataset()
    put_text(ds, keyword, value)
    back = _round_trip(ds)[keyword]
    assert back.VR == vr
    if isinstance(expected, list):
        assert [float(v) for v in back.value] == expected
    else:
        assert back.value == expected


@pytest.mark.parametrize("keyword, vr, values", [("DimensionIndexValues", "UL", [3, 70000]),
                                                ("ReferencedSegmentNumber", "US", [7])])
def test_put_uint_reads_back_as_the_value(keyword, vr, values) -> None:
    ds = Dataset()
    put_uint(ds, keyword, values)
    assert ds[keyword].VR == vr
    back = _round_trip(ds)[keyword].value
    assert (list(back) if len(values) > 1 else [back]) == values


def test_put_refuses_unknown_keywords_and_the_wrong_kind_of_vr() -> None:
    with pytest.raises(KeyError):
        put_text(Dataset(), "NoSuchKeyword", "1")
    with pytest.raises(ValueError, match="VR US"):
        put_text(Dataset(), "ReferencedSegmentNumber", "1")
    with pytest.raises(ValueError, match="VR UI"):
        put_uint(Dataset(), "ReferencedSOPInstanceUID", [1])


def test_raw_elements_are_written_as_they_are(tmp_path) -> None:
    """pydicom decodes raw elements before writing unless the item says it holds that
    encoding; decoding 100 000 DS values cost seconds, so the writers rely on this."""
    item = Dataset()
    put_text(item, "ContourData", ["1.000", "2.000", "3.000"] * 1000)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = "1.2.3"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ContourSequence = DicomSequence([item])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    write_dataset(ds, tmp_path / "a.dcm")
    assert ds.ContourSequence[0].get_item("ContourData").is_raw  # not decoded to write it
    back = pydicom.dcmread(tmp_path / "a.dcm")
    assert [float(v) for v in back.ContourSequence[0].ContourData[:3]] == [1.0, 2.0, 3.0]


def test_encoded_sequences_read_back_as_the_values() -> None:
    code = encode_item([encode_text("CodeMeaning", "Segmentation"), encode_text("CodeValue", "113076"),
                        encode_text("CodingSchemeDesignator", "DCM")])  # given out of tag order
    frame = encode_item([
        encode_sequence("DerivationCodeSequence", [code]),
        encode_text("ReferencedSOPInstanceUID", "1.2.345"),  # odd length: padded with NUL
        encode_uint("DimensionIndexValues", (2, 70000)),
        encode_uint("ReferencedSegmentNumber", (3,)),
        encode_text("ContourData", ["-1.500", "2.250", "17"]),
    ])
    ds = Dataset()
    put_sequence(ds, "PerFrameFunctionalGroupsSequence", [frame, frame])
    back = _round_trip(ds).PerFrameFunctionalGroupsSequence
    assert len(back) == 2
    item = back[1]
    assert [e.keyword for e in item] == ["ReferencedSOPInstanceUID", "DerivationCodeSequence", "DimensionIndexValues",
                                         "ReferencedSegmentNumber", "ContourData"]  # written in tag order
    assert item.ReferencedSOPInstanceUID == "1.2.345"
    assert item.DerivationCodeSequence[0].CodeValue == "113076"
    assert item.DerivationCodeSequence[0].CodeMeaning == "Segmentation"
    assert list(item.DimensionIndexValues) == [2, 70000] and item.ReferencedSegmentNumber == 3
    assert [float(v) for v in item.ContourData] == [-1.5, 2.25, 17.0]
    # and the same in memory, before writing
    assert ds.PerFrameFunctionalGroupsSequence[0].DerivationCodeSequence[0].CodingSchemeDesignator == "DCM"


def test_encoders_refuse_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="65534"):
        encode_text("ContourData", ["123456.789"] * 7000)  # a 2-byte length holds at most 64 KB
    with pytest.raises(ValueError, match="not a sequence"):
        encode_sequence("ContourData", [])
    with pytest.raises(ValueError, match="not a sequence"):
        put_sequence(Dataset(), "ContourData", [])
    with pytest.raises(ValueError, match="not a text element"):
        encode_text("ReferencedSegmentNumber", "1")
    with pytest.raises(ValueError, match="not US or UL"):
        encode_uint("ContourData", [1])
