"""Write the contours as a DICOM Segmentation (SEG); ``autocontour.readback`` reads SEGs back.

The writer builds the Segmentation IOD with pydicom directly; its output is checked
element by element against highdicom's ``Segmentation`` built from the same masks
(``tests/test_dicom_seg.py``), which was this writer until highdicom's constructor
(~2 s per CT, on the critical path: loading its JSON tables of the standard, checking
which CT attributes belong to the IOD, an overlap sum over a (frames x rows x columns x
segments) array, per-value DS validation) was measured as the slowest stage of the app.
The reader (``readback.read_seg_masks``) still uses highdicom.  Choices, and why:

* ``BINARY`` segmentation type, one segment per structure: targets overlap organs, which
  a ``LABELMAP`` cannot hold.  Segments follow the order of the structure table
  (``autocontour.structures.STRUCTURES``), restricted to the structures passed in.
* Every segment label, code and colour comes from the structure table: SegmentLabel is
  the TG-263 name, the category/type codes are the table's SNOMED CT codes, the
  recommended display colour is the table's RGB converted to CIELab, and a lateral
  structure (Parotid_L/R) carries its laterality (SCT Left/Right, CID 244) in the
  Segmented Property Type Modifier Code Sequence nested in the type code item, as
  PS3.3 C.8.20.2 (Segment Description Macro) defines it.
* Frames lie on the CT slices themselves (one frame per non-empty slice and segment,
  empty frames omitted), so each frame references its source CT slice and takes that
  slice's ImagePositionPatient; the plane geometry is never recomputed.  Frames are
  ordered segment by segment, then along the slice normal, with Dimension Index Values
  (segment number, plane position), as highdicom orders them.  The SEG references every
  slice of the CT series (Referenced Series / Source Image Sequence).
* Patient and study attributes are those of the CT Image IOD's Patient and Study
  modules, copied from the first slice (``dicom_elements.copy_patient_and_study``, the
  list highdicom derives from its tables of the standard, shared with the RTSTRUCT).
* Native (uncompressed) transfer syntax: BINARY frames are bit-packed (1 bit/pixel,
  frames back to back with no padding between them), so compression would cost time for
  little gain.

The CT headers in ``Volume.datasets`` lack PixelData; the writer needs only their
metadata (Rows, Columns, PixelSpacing, ImageOrientationPatient, ImagePositionPatient,
patient and study attributes).
"""

from __future__ import annotations

import copy
import datetime
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat, format_number_as_ds

from autocontour.dicom_elements import (
    copy_patient_and_study, encode_item, encode_sequence, encode_text, encode_uint, put_sequence, put_text,
    require_lo,
)
from autocontour.errors import GeometryError
from autocontour.postprocess import bounding_box
from autocontour.structures import STRUCTURES, Code, StructureDefinition, structure
from autocontour.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["build_seg", "cielab_color", "CONTENT_LABEL", "SEGMENTATION_STORAGE", "SEG_STORAGE_UIDS"]

CONTENT_LABEL = "AUTOSEG"
DEFAULT_MANUFACTURER = "autocontour"
DEFAULT_MODEL_NAME = "autocontour head-and-neck auto-segmentation"
DEFAULT_CONTENT_CREATOR = "AUTOCONTOUR^"  # PN: family name only (trailing caret)
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SEG_STORAGE_UIDS = (SEGMENTATION_STORAGE, "1.2.840.10008.5.1.4.1.1.66.7")

# DCM codes (PS3.16)
_ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162
_SEGMENTATION = Code("113076", "DCM", "Segmentation")  # CID 7203, derivation
_SOURCE_IMAGE = Code("121322", "DCM", "Source image for image processing operation")  # CID 7202
_ACQUISITION_EQUIPMENT = Code("109101", "DCM", "Acquisition Equipment")

def _code_item(code: Code) -> Dataset:
    """A Code Sequence item (Basic Coded Entry Attributes)."""
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning
    return item


def cielab_color(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The table's sRGB colour as the value DICOM stores (RecommendedDisplayCIELabValue).

    sRGB (D65) -> CIE XYZ -> CIE L*a*b*, then L* scaled from 0-100 and a*, b* from
    -128-127 to 0-65535 (PS3.3 C.10.7.1.1), with the constants highdicom's
    ``CIELabColor.from_rgb`` uses (tests check every table colour against it).
    """

    def linear(c: float) -> float:
        c = c / 255.0
        return ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92

    if not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"RGB components must lie in 0-255, got {rgb}")
    r, g, b = (linear(c) * 100 for c in rgb)
    xyz = (
        (r * 0.4124 + g * 0.3576 + b * 0.1805) / 95.047,
        (r * 0.2126 + g * 0.7152 + b * 0.0722) / 100.0,
        (r * 0.0193 + g * 0.1192 + b * 0.9505) / 108.883,
    )
    fx, fy, fz = (c ** (1.0 / 3) if c >= 8.85645167903563082e-3 else (841.0 / 108.0) * c + (4.0 / 29.0) for c in xyz)
    lab = (116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz))
    return (
        int(round(lab[0] * 0xFFFF / 100.0)),
        int(round((lab[1] + 128.0) * 0xFFFF / 255.0)),
        int(round((lab[2] + 128.0) * 0xFFFF / 255.0)),
    )


def _segment_description(number: int, definition: StructureDefinition, algorithm: Dataset) -> Dataset:
    """One Segment Sequence item (Segment Description Macro, PS3.3 C.8.20.2)."""
    desc = Dataset()
    desc.SegmentNumber = number
    desc.SegmentLabel = definition.name
    desc.SegmentedPropertyCategoryCodeSequence = [_code_item(definition.category)]
    prop_type = _code_item(definition.type)
    lat = definition.laterality_code
    if lat is not None:
        # Segmented Property Type Modifier Code Sequence (0062,0011), nested in the
        # Segmented Property Type Code Sequence item, BCID 244
        prop_type.SegmentedPropertyTypeModifierCodeSequence = [_code_item(lat)]
    desc.SegmentedPropertyTypeCodeSequence = [prop_type]
    desc.SegmentAlgorithmType = "AUTOMATIC"
    desc.SegmentAlgorithmName = algorithm.AlgorithmName
    desc.SegmentationAlgorithmIdentificationSequence = [copy.deepcopy(algorithm)]
    desc.RecommendedDisplayCIELabValue = list(cielab_color(definition.rgb))
    return desc


def _algorithm_identification(name: str, version: str) -> Dataset:
    """Algorithm Identification Macro item (family: Artificial Intelligence)."""
    item = Dataset()
    item.AlgorithmFamilyCodeSequence = [_code_item(_ARTIFICIAL_INTELLIGENCE)]
    item.AlgorithmName = name
    item.AlgorithmVersion = version
    return item


def _acquisition_equipment(ct: Dataset) -> Dataset | None:
    """Contributing Equipment item for the scanner that acquired the CT (None without a Manufacturer)."""
    manufacturer = ct.get("Manufacturer")
    if not manufacturer:
        return None
    item = Dataset()
    item.Manufacturer = manufacturer
    for keyword in ("InstitutionName", "InstitutionAddress", "StationName", "InstitutionalDepartmentName",
                    "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions"):
        if ct.get(keyword) is not None:
            item[keyword] = copy.deepcopy(ct[keyword])
    item.PurposeOfReferenceCodeSequence = [_code_item(_ACQUISITION_EQUIPMENT)]
    when = ct.get("AcquisitionDateTime")
    if when is None:
        date, tm = ct.get("AcquisitionDate"), ct.get("AcquisitionTime")
        if isinstance(date, datetime.date) and isinstance(tm, datetime.time):
            when = datetime.datetime.combine(date, tm)
    if when is not None:
        item.ContributionDateTime = when
    item.ContributionDescription = "Acquisition equipment of the source image(s)"
    return item


def _ordered_structures(masks: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> list[StructureDefinition]:
    for name, mask in masks.items():
        structure(name)  # KeyError listing the valid names
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise TypeError(f"mask {name!r} must be a boolean numpy array, got {getattr(mask, 'dtype', type(mask))}")
        if mask.shape != shape:
            raise ValueError(f"mask {name!r} has shape {mask.shape}, the volume has {shape} (k, j, i)")
    return [s for s in STRUCTURES if s.name in masks]


def _slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal highdicom sorts planes along (``get_normal_vector`` with its volume index
    convention: column cosines x row cosines, so that (normal, column, row) is right-handed)."""
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    n = np.cross(col, row)
    return n / np.linalg.norm(n)


def _segments_overlap(masks: Sequence[np.ndarray], boxes: Sequence[tuple[slice, ...] | None]) -> bool:
    """Whether any voxel is in two masks (checked only where their bounding ``boxes`` meet)."""
    for a in range(len(masks)):
        for b in range(a + 1, len(masks)):
            if boxes[a] is None or boxes[b] is None:
                continue
            inter = tuple(slice(max(p.start, q.start), min(p.stop, q.stop)) for p, q in zip(boxes[a], boxes[b]))
            if all(s.start < s.stop for s in inter) and np.logical_and(masks[a][inter], masks[b][inter]).any():
                return True
    return False


def _ds_text(values: Sequence) -> list[str]:
    """DS values formatted as highdicom formats plane positions (<= 16 characters each)."""
    return [format_number_as_ds(float(v)) for v in values]


def build_seg(
    volume: Volume,
    masks: Mapping[str, np.ndarray],
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_description: str,
    series_number: int = 902,
    manufacturer: str = DEFAULT_MANUFACTURER,
    manufacturer_model_name: str = DEFAULT_MODEL_NAME,
    device_serial_number: str = "1",
    content_creator_name: str = DEFAULT_CONTENT_CREATOR,
    content_description: str = "Automatic head-and-neck segmentation",
    institution_name: str | None = None,
) -> Dataset:
    """A DICOM-SEG (BINARY, one segment per structure) of ``masks`` on the CT of ``volume``.

    Args:
        volume: the CT the masks were computed on; its ``datasets`` (headers of the CT
            slices in k order, pixel data not needed) are the source images.
        masks: boolean arrays of shape ``volume.array.shape`` in (k, j, i) order, keyed by
            TG-263 names of the structure table.  Segments follow the table's order; a
            structure passed with an all-false mask becomes a segment with no frames.
        algorithm_name, algorithm_version: recorded per segment in the Segmentation
            Algorithm Identification Sequence (family: Artificial Intelligence) and as
            SoftwareVersions.
        series_description: SeriesDescription of the new SEG series.
        series_number: SeriesNumber of the new SEG series.

    Returns:
        A ``pydicom.Dataset`` (Segmentation Storage, explicit VR little endian, with file
        meta) with fresh Series/SOP Instance UIDs; patient and study attributes are copied
        from the CT.  Write it with ``autocontour.dicom_elements.write_dataset``.

    Raises:
        KeyError: a name is not in the structure table.
        TypeError, ValueError: a mask is not boolean or not on the volume's grid; no
            masks; the volume has no source headers for its slices.
        GeometryError: the CT has no FrameOfReferenceUID.
    """
    t0 = time.perf_counter()
    shape = tuple(volume.array.shape)
    defs, ct, frame_of_reference = _checked_inputs(volume, masks)
    for what, text in (("manufacturer", manufacturer), ("manufacturer model name", manufacturer_model_name),
                       ("device serial number", device_serial_number), ("algorithm version", algorithm_version),
                       ("content description", content_description), ("series description", series_description),
                       ("algorithm name", algorithm_name), ("institution name", institution_name or "")):
        require_lo(text, what)
    arrays = [masks[d.name] for d in defs]
    boxes = [bounding_box(m) for m in arrays]
    frames = _frame_plan(volume, arrays, boxes)

    seg = Dataset()
    _sop_common(seg, ct)
    copy_patient_and_study(seg, ct)
    _series(seg, series_number, series_description)
    _frame_of_reference(seg, ct, frame_of_reference)
    _equipment(seg, manufacturer, manufacturer_model_name, device_serial_number, algorithm_version, institution_name)
    _segmentation_image(seg, ct, shape, content_description, content_creator_name)
    _segments(seg, defs, arrays, boxes, _algorithm_identification(algorithm_name, algorithm_version))
    _multiframe_dimension(seg)
    _shared_functional_groups(seg, volume, ct)
    # Per-frame functional groups
    put_sequence(seg, "PerFrameFunctionalGroupsSequence", _per_frame_items(volume, frames))
    seg.NumberOfFrames = len(frames)
    # every CT slice is referenced, in k order (the frames reference theirs one by one)
    _reference_all_slices(seg, volume)
    _pixel_data(seg, arrays, frames, shape)
    _file_meta(seg)
    logger.info(
        "DICOM-SEG: %d segments, %d frames on %d CT slices (%.2f s)",
        len(defs), len(frames), shape[0], time.perf_counter() - t0,
    )
    return seg


def _checked_inputs(volume: Volume, masks: Mapping[str, np.ndarray]) -> tuple[list[StructureDefinition], Dataset, str]:
    """The structures in table order, the first CT header and the frame of reference, or the error."""
    shape = tuple(volume.array.shape)
    if not masks:
        raise ValueError("no masks to write: pass at least one structure")
    if len(volume.datasets) != shape[0] or len(volume.sop_instance_uids) != shape[0]:
        raise ValueError(
            f"volume has {shape[0]} slices but {len(volume.datasets)} headers / "
            f"{len(volume.sop_instance_uids)} SOP instance UIDs; build it with build_volume"
        )
    defs = _ordered_structures(masks, shape)
    ct = volume.datasets[0]
    frame_of_reference = volume.frame_of_reference_uid or str(ct.get("FrameOfReferenceUID", ""))
    if not frame_of_reference:
        raise GeometryError(
            f"series {volume.series_instance_uid}: the CT has no FrameOfReferenceUID, so the segmentation "
            "cannot be placed in the patient by a viewer or planning system - re-export the CT from the scanner"
        )
    return defs, ct, frame_of_reference


def _frame_plan(
    volume: Volume, arrays: Sequence[np.ndarray], boxes: Sequence[tuple[slice, ...] | None]
) -> list[tuple[int, int, int]]:
    """(segment index, slice k, plane position number) of each frame, in frame order.

    Segment by segment, each over its occupied slices in the order of the slice normal;
    plane positions are numbered over the slices that hold any structure.
    """
    shape = tuple(volume.array.shape)
    ct = volume.datasets[0]
    occupied = []
    for m, box in zip(arrays, boxes):
        occ = np.zeros(shape[0], bool)
        if box is not None:  # only the box's slab can hold the structure
            occ[box[0]] = m[box[0]].reshape(box[0].stop - box[0].start, -1).any(axis=1)
        occupied.append(occ)
    any_occupied = np.logical_or.reduce(occupied) if occupied else np.zeros(shape[0], bool)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in volume.datasets])
    distance = positions @ _slice_normal([float(v) for v in ct.ImageOrientationPatient])
    planes = [int(k) for k in np.argsort(distance, kind="stable") if any_occupied[k]]
    frames: list[tuple[int, int, int]] = []
    if planes:
        for s, occ in enumerate(occupied):
            frames += [(s, k, p) for p, k in enumerate(planes, start=1) if occ[k]]
    else:
        # nothing to write: every segment gets one empty frame on the first slice
        logger.warning("all %d masks are empty; the SEG will hold one empty frame per segment", len(arrays))
        frames = [(s, 0, 1) for s in range(len(arrays))]
    return frames


def _sop_common(seg: Dataset, ct: Dataset) -> None:
    """SOP Common module, and the CT scanner as Contributing Equipment."""
    now = datetime.datetime.now()
    if "SpecificCharacterSet" in ct:  # our own text is ASCII: the CT's character set holds it
        seg.SpecificCharacterSet = copy.deepcopy(ct.SpecificCharacterSet)
    seg.SOPClassUID = SEGMENTATION_STORAGE
    seg.SOPInstanceUID = generate_uid()
    seg.InstanceCreationDate = now.strftime("%Y%m%d")
    seg.InstanceCreationTime = now.strftime("%H%M%S.%f")
    equipment = _acquisition_equipment(ct)
    if equipment is not None:
        seg.ContributingEquipmentSequence = [equipment]


def _series(seg: Dataset, series_number: int, series_description: str) -> None:
    """General Series and Segmentation Series modules (a new series)."""
    seg.Modality = "SEG"
    seg.SeriesInstanceUID = generate_uid()
    seg.SeriesNumber = series_number
    seg.SeriesDescription = series_description


def _frame_of_reference(seg: Dataset, ct: Dataset, frame_of_reference: str) -> None:
    """Frame of Reference module: the CT's."""
    seg.FrameOfReferenceUID = frame_of_reference
    seg.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", None)


def _equipment(seg: Dataset, manufacturer: str, model_name: str, serial_number: str, software_versions: str,
               institution_name: str | None) -> None:
    """General Equipment and Enhanced General Equipment modules: this software."""
    seg.Manufacturer = manufacturer
    seg.ManufacturerModelName = model_name
    seg.DeviceSerialNumber = serial_number
    seg.SoftwareVersions = software_versions
    if institution_name is not None:
        seg.InstitutionName = institution_name


def _segmentation_image(seg: Dataset, ct: Dataset, shape: tuple[int, ...], content_description: str,
                        content_creator_name: str) -> None:
    """General Image, Segmentation Image (without its segments) and Image Pixel modules."""
    seg.InstanceNumber = 1
    seg.ContentDate = seg.InstanceCreationDate
    seg.ContentTime = seg.InstanceCreationTime
    seg.ImageType = ["DERIVED", "PRIMARY"]
    seg.ContentLabel = CONTENT_LABEL
    seg.ContentDescription = content_description
    seg.ContentCreatorName = content_creator_name
    seg.SegmentationType = "BINARY"
    seg.SamplesPerPixel = 1
    seg.PhotometricInterpretation = "MONOCHROME2"
    seg.PresentationLUTShape = "IDENTITY"
    seg.BitsAllocated = 1
    seg.BitsStored = 1
    seg.HighBit = 0
    seg.PixelRepresentation = 0
    seg.LossyImageCompression = ct.get("LossyImageCompression", "00")
    if seg.LossyImageCompression == "01":
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in ct:
                seg[keyword] = copy.deepcopy(ct[keyword])
    seg.Rows, seg.Columns = shape[1], shape[2]


def _segments(seg: Dataset, defs: Sequence[StructureDefinition], arrays: Sequence[np.ndarray],
              boxes: Sequence[tuple[slice, ...] | None], algorithm: Dataset) -> None:
    """Segmentation Image module's Segment Sequence, one segment per structure, and SegmentsOverlap."""
    seg.SegmentSequence = [_segment_description(n, d, algorithm) for n, d in enumerate(defs, start=1)]
    seg.SegmentsOverlap = "YES" if _segments_overlap(arrays, boxes) else "NO"


def _multiframe_dimension(seg: Dataset) -> None:
    """Multi-frame Dimension module: segment number, then plane position."""
    organisation = generate_uid()
    dims = []
    for pointer, group, label in (
        (0x0062000B, 0x0062000A, "Referenced Segment Number"),
        (0x00200032, 0x00209113, "Image Position Patient"),
    ):
        dim = Dataset()
        dim.DimensionOrganizationUID = organisation
        dim.DimensionIndexPointer = pointer
        dim.FunctionalGroupPointer = group
        dim.DimensionDescriptionLabel = label
        dims.append(dim)
    seg.DimensionIndexSequence = dims
    org = Dataset()
    org.DimensionOrganizationUID = organisation
    seg.DimensionOrganizationSequence = [org]


def _shared_functional_groups(seg: Dataset, volume: Volume, ct: Dataset) -> None:
    """Shared Functional Groups: the CT's plane orientation and pixel measures."""
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = copy.deepcopy(ct.ImageOrientationPatient)
    shared.PlaneOrientationSequence = [orientation]
    measures = Dataset()
    if "SliceThickness" in ct:
        measures.SliceThickness = copy.deepcopy(ct.SliceThickness)
    # the measured slice step (the CT's own SpacingBetweenSlices may be negative, e.g.
    # Philips, which the Pixel Measures macro forbids); exact for frames on the CT's slices
    measures.SpacingBetweenSlices = DSfloat(float(volume.spacing[0]), auto_format=True)
    measures.PixelSpacing = copy.deepcopy(ct.PixelSpacing)
    shared.PixelMeasuresSequence = [measures]
    seg.SharedFunctionalGroupsSequence = [shared]


def _pixel_data(seg: Dataset, arrays: Sequence[np.ndarray], frames: Sequence[tuple[int, int, int]],
                shape: tuple[int, ...]) -> None:
    """Pixel Data: frames back to back, 1 bit per pixel, little-endian bit order."""
    if (shape[1] * shape[2]) % 8 == 0:  # whole bytes per frame: pack frame by frame, in place
        packed_frames = np.empty((len(frames), shape[1] * shape[2] // 8), np.uint8)
        for f, (s, k, _) in enumerate(frames):
            packed_frames[f] = np.packbits(arrays[s][k], axis=None, bitorder="little")
        packed = packed_frames.tobytes()
    else:  # a frame ends inside a byte: the next one starts at the following bit
        bits = np.empty((len(frames), shape[1], shape[2]), bool)
        for f, (s, k, _) in enumerate(frames):
            bits[f] = arrays[s][k]
        packed = np.packbits(bits, axis=None, bitorder="little").tobytes()
    if len(packed) % 2:
        packed += b"\x00"
    seg.add(DataElement(0x7FE00010, "OB", packed))


def _file_meta(seg: Dataset) -> None:
    """Preamble and File Meta Information (explicit VR little endian)."""
    seg.preamble = b"\x00" * 128  # a Part 10 file also with plain save_as()
    seg.file_meta = FileMetaDataset()
    seg.file_meta.MediaStorageSOPClassUID = seg.SOPClassUID
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    seg.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    validate_file_meta(seg.file_meta, enforce_standard=True)  # version and implementation UID
    seg.file_meta.FileMetaInformationGroupLength = 0  # the length is computed when written


def _per_frame_items(volume: Volume, frames: Sequence[tuple[int, int, int]]) -> list[bytes]:
    """Per-Frame Functional Groups items: frame content, plane position, derivation, segment.

    Encoded directly (``dicom_elements.encode_item``): one item per frame, each with six
    nested items, is thousands of pydicom datasets for a planning CT.
    """
    def code(c: Code) -> bytes:
        return encode_item([encode_text("CodeValue", c.value), encode_text("CodingSchemeDesignator", c.scheme),
                            encode_text("CodeMeaning", c.meaning)])

    derivation_code = encode_sequence("DerivationCodeSequence", [code(_SEGMENTATION)])
    purpose = encode_sequence("PurposeOfReferenceCodeSequence", [code(_SOURCE_IMAGE)])
    preserved = encode_text("SpatialLocationsPreserved", "YES")
    per_slice: dict[int, tuple[bytes, bytes]] = {}
    items = []
    for s, k, p in frames:
        if k not in per_slice:
            ct = volume.datasets[k]
            source = encode_item([
                encode_text("ReferencedSOPClassUID", str(ct.SOPClassUID)),
                encode_text("ReferencedSOPInstanceUID", volume.sop_instance_uids[k]),
                preserved, purpose,
            ])
            derivation = encode_sequence("DerivationImageSequence", [encode_item([
                derivation_code, encode_sequence("SourceImageSequence", [source]),
            ])])
            position = encode_sequence("PlanePositionSequence", [encode_item([
                encode_text("ImagePositionPatient", _ds_text(ct.ImagePositionPatient)),
            ])])
            per_slice[k] = derivation, position
        derivation, position = per_slice[k]
        items.append(encode_item([
            derivation,
            encode_sequence("FrameContentSequence", [encode_item([encode_uint("DimensionIndexValues", (s + 1, p))])]),
            position,
            encode_sequence("SegmentIdentificationSequence", [encode_item([
                encode_uint("ReferencedSegmentNumber", (s + 1,)),
            ])]),
        ]))
    return items


def _reference_all_slices(seg: Dataset, volume: Volume) -> None:
    """Source Image Sequence and Referenced Series Sequence listing every CT slice, in k order."""
    refs = []
    for ds, uid in zip(volume.datasets, volume.sop_instance_uids):
        ref = Dataset()
        put_text(ref, "ReferencedSOPClassUID", str(ds.SOPClassUID))
        put_text(ref, "ReferencedSOPInstanceUID", uid)
        refs.append(ref)
    seg.SourceImageSequence = refs
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid or volume.datasets[0].SeriesInstanceUID
    series.ReferencedInstanceSequence = [copy.copy(r) for r in refs]
    seg.ReferencedSeriesSequence = [series]
