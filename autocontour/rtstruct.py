"""RT Structure Set writer: masks -> planar contours on the CT's own slices.

Writing (``mask_to_contours``, ``build_rtstruct``; ``dicom_elements.write_dataset`` saves it)
    Each slice ``k`` of a boolean mask is traced with marching squares at level 0.5 on
    the mask padded by one pixel (``autocontour.tracing``, all slices of a structure at
    once), so every outer boundary and every hole boundary is its own closed polygon.
    Planning systems (Eclipse, RayStation, Monaco, Pinnacle) combine the contours of one
    ROI on one slice by the even-odd rule, so a hole is written as one more contour
    inside its outer boundary.  All geometry goes through
    ``Volume.affine``; the points of a contour all carry exactly the z of the CT slice
    they are drawn on and reference that slice's SOP Instance UID.

Reading back (``autocontour.readback.rasterise_rtstruct``): because marching-squares
vertices lie halfway between a pixel centre inside and one outside, and the traced edges
never pass through a pixel centre, ``build_rtstruct`` followed by ``rasterise_rtstruct``
gives back the mask exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from autocontour.dicom_elements import (
    PATIENT_STUDY_KEYWORDS, copy_patient_and_study, encode_item, encode_sequence, encode_text, format_contour_data,
    format_ds, mark_explicit_little, put_sequence, require_lo,
)
from autocontour.errors import GeometryError
from autocontour.postprocess import bounding_box
from autocontour.structures import StructureDefinition, structure
from autocontour.tracing import trace_slices
from autocontour.volume import AXIS_ALIGNMENT_TOLERANCE, Volume

logger = logging.getLogger(__name__)

__all__ = [
    "RT_STRUCTURE_SET_STORAGE",
    "DETACHED_STUDY_MANAGEMENT",
    "mask_to_contours",
    "build_rtstruct",
]

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# Retired, but it is the value the RT Structure Set IOD examples and every planning
# system use for RT Referenced Study Sequence > Referenced SOP Class UID.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

# StructureSetLabel is a short string (SH, 16 characters).
STRUCTURE_SET_LABEL = "AutoContour"

# --------------------------------------------------------------------------- writing


def mask_to_contours(
    mask2d: np.ndarray, affine: np.ndarray, k: int, origin_rc: tuple[int, int] = (0, 0)
) -> list[np.ndarray]:
    """Closed planar contours of slice ``k`` of a mask, as (N, 3) LPS polygons in mm.

    Every outer boundary and every hole boundary is its own closed polygon (holes are
    represented by the even-odd rule), separate islands are kept.  The closing vertex
    is not repeated, collinear vertices are removed, and every polygon has at least 3
    distinct points.  Marching squares at level 0.5 (``autocontour.tracing``, the
    polygons of ``skimage.measure.find_contours``) never makes self-intersecting polygons
    or polygons that cross each other.

    Args:
        mask2d: (rows, columns) mask of slice ``k``; nonzero is inside.
        affine: 4x4 matrix mapping index ``(k, j, i, 1)`` to LPS mm.
        k: the slice index, used to place the polygon in the patient.
        origin_rc: (row, column) of ``mask2d[0, 0]`` on the slice, when ``mask2d`` is a
            crop of it (contours of a crop that holds the whole structure are those of
            the slice).

    Returns:
        One float array of shape (N, 3) per polygon, in LPS mm.
    """
    mask2d = np.asarray(mask2d) != 0
    if mask2d.ndim != 2:
        raise ValueError(f"mask2d must be 2-D, got shape {mask2d.shape}")
    polygons = trace_slices(mask2d[None]).get(0, [])
    return [_to_patient(rc, affine, k, origin_rc) for rc in polygons]


def _to_patient(rc: np.ndarray, affine: np.ndarray, k: int, origin_rc: tuple[int, int]) -> np.ndarray:
    """(N, 2) (row, column) vertices of slice ``k`` (of a crop at ``origin_rc``) -> (N, 3) LPS mm."""
    lin = np.asarray(affine, dtype=float)[:3, :3]
    origin = np.asarray(affine, dtype=float)[:3, 3] + lin[:, 0] * k
    rc = rc + np.asarray(origin_rc, dtype=float)
    return origin + rc[:, 0:1] * lin[:, 1] + rc[:, 1:2] * lin[:, 2]


def _require_axial(volume: Volume) -> None:
    """Contours are written on the CT's own slices, which must be axial planes."""
    unit = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    in_plane_z = np.abs(unit[2, 1:]).max()
    normal_off_z = np.abs(unit[:2, 0]).max()
    if in_plane_z > AXIS_ALIGNMENT_TOLERANCE or normal_off_z > AXIS_ALIGNMENT_TOLERANCE:
        raise GeometryError(
            f"series {volume.series_instance_uid}: slices are not axial (direction {np.round(unit, 4).tolist()}); "
            "RTSTRUCT contours are written on axial CT slices only - send an axial reconstruction"
        )


def _slice_z_text(volume: Volume, k: int) -> str:
    """z (LPS) of slice ``k`` as written in ContourData: the slice's own plane.

    The text of the slice's own ImagePositionPatient z is reused verbatim, so the
    contour's z equals the image's z exactly (not just to a micrometre); the affine's
    z is used when the header has none or it is not a usable DS.
    """
    z_affine = float(volume.affine[2, 0] * k + volume.affine[2, 3])
    ipp = getattr(volume.datasets[k], "ImagePositionPatient", None)
    if ipp is None or len(ipp) != 3:
        return format_ds(z_affine)
    text = str(ipp[2]).strip()
    try:
        z_own = float(text)
    except ValueError:
        return format_ds(z_affine)
    if abs(z_own - z_affine) > 0.25 * abs(volume.affine[2, 0]):
        logger.warning(
            "slice %d (%s): ImagePositionPatient z %.3f is far from the volume's %.3f; using the volume's",
            k, volume.sop_instance_uids[k], z_own, z_affine,
        )
        return format_ds(z_affine)
    if len(text) > 16 or not np.isfinite(z_own):
        return format_ds(z_own)
    return text


def _sop_class(ds) -> str:
    return str(getattr(ds, "SOPClassUID", "") or CTImageStorage)


def _image_ref(ds, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = _sop_class(ds)
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item


def _choose_character_set(ct: Dataset, texts: Iterable[str]) -> str | list[str]:
    """The CT's SpecificCharacterSet when all our text fits in it, else UTF-8."""
    charset = ct.get("SpecificCharacterSet")
    texts = [t for t in texts if t]
    if not charset:
        return "ISO_IR 192"
    encodings = convert_encodings(charset)
    for text in texts:
        if not any(_encodes(text, enc) for enc in encodings):
            logger.info("text %r does not fit character set %s; writing ISO_IR 192 (UTF-8)", text, charset)
            return "ISO_IR 192"
    return charset


def _encodes(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


def build_rtstruct(
    volume: Volume,
    masks: Mapping[str, np.ndarray],
    *,
    series_description: str,
    algorithm_name: str,
    algorithm_version: str,
    series_number: int = 901,
    definitions: Mapping[str, StructureDefinition] | None = None,
) -> Dataset:
    """An RT Structure Set (1.2.840.10008.5.1.4.1.1.481.3) of ``masks`` on ``volume``.

    One ROI per mask, in the order of ``masks``, numbered from 1.  Name, display colour
    and RT ROI Interpreted Type come from the structure table (``definitions`` may
    replace it, e.g. for structures read from another RTSTRUCT).  Contours are written
    on the CT's own axial slices and reference them.

    A structure whose mask is empty keeps its Structure Set ROI, ROI Contour (with its
    colour) and RT ROI Observations items, but its ROI Contour item has no Contour
    Sequence (a type 3 attribute): planning systems import it as an empty structure,
    which tells the reviewer it was looked for and not found.  This is logged.

    Args:
        volume: the CT the masks were computed on; ``volume.datasets`` hold its headers.
        masks: structure name -> (k, j, i) mask with ``volume.array.shape``.
        series_description: SeriesDescription of the new series (the app says there that
            the contours are an automatic proposal to be reviewed).
        algorithm_name: written as Manufacturer, ManufacturerModelName and in
            ROIGenerationDescription.
        algorithm_version: written as SoftwareVersions and in ROIGenerationDescription.
        series_number: SeriesNumber of the new series.
        definitions: structure name -> definition; default: the structure table.

    Raises:
        ValueError: no masks, or a mask with the wrong shape, or no CT headers.
        KeyError: a name that is not in the structure table.
        GeometryError: no FrameOfReferenceUID / StudyInstanceUID, or non-axial slices.
    """
    if not masks:
        raise ValueError("build_rtstruct needs at least one mask")
    n_slices = volume.array.shape[0]
    if len(volume.datasets) != n_slices or len(volume.sop_instance_uids) != n_slices:
        raise ValueError(
            f"volume has {n_slices} slices but {len(volume.datasets)} headers and "
            f"{len(volume.sop_instance_uids)} SOP Instance UIDs"
        )
    if not volume.frame_of_reference_uid:
        raise GeometryError(
            f"series {volume.series_instance_uid}: the CT has no FrameOfReferenceUID, so contours cannot be "
            "placed in the patient by a planning system - re-export the CT from the scanner"
        )
    ct = volume.datasets[0]
    study_uid = volume.study_instance_uid or str(getattr(ct, "StudyInstanceUID", ""))
    if not study_uid:
        raise GeometryError(f"series {volume.series_instance_uid}: the CT has no StudyInstanceUID")
    _require_axial(volume)
    defs = [definitions[name] if definitions is not None else structure(name) for name in masks]
    for name, mask in masks.items():
        if np.shape(mask) != volume.array.shape:
            raise ValueError(f"mask {name!r} has shape {np.shape(mask)}, volume has {volume.array.shape}")

    for what, text in (("series description", series_description), ("algorithm name", algorithm_name),
                       ("algorithm version", algorithm_version)):
        require_lo(text, what)
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    generation = require_lo(f"{algorithm_name} {algorithm_version}", "algorithm name and version")

    ds = Dataset()
    # SOP Common
    ds.SpecificCharacterSet = _choose_character_set(
        ct,
        [str(ct[kw].value) for kw in PATIENT_STUDY_KEYWORDS if kw in ct and ct[kw].VR != "SQ"]
        + [series_description, algorithm_name, algorithm_version],
    )
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = generate_uid()
    # Patient, Clinical Trial Subject, General Study, Patient Study, Clinical Trial Study
    copy_patient_and_study(ds, ct)
    ds.StudyInstanceUID = study_uid
    # Frame of Reference (the CT's; the IOD has it since the Frame of Reference module
    # was added to RT Structure Set; older readers use the ReferencedFrameOfReferenceSequence)
    ds.FrameOfReferenceUID = volume.frame_of_reference_uid
    ds.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "")
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = series_description
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = algorithm_name
    ds.ManufacturerModelName = algorithm_name
    ds.SoftwareVersions = algorithm_version
    # Structure Set
    ds.StructureSetLabel = STRUCTURE_SET_LABEL
    ds.StructureSetName = series_description
    ds.InstanceNumber = 1
    ds.StructureSetDate = date
    ds.StructureSetTime = time
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(volume, study_uid)])

    slice_z = [_slice_z_text(volume, k) for k in range(n_slices)]
    # each slice's Contour Image Sequence, encoded once for every structure drawn on it
    slice_images = [
        encode_sequence("ContourImageSequence", [encode_item([
            encode_text("ReferencedSOPClassUID", _sop_class(volume.datasets[k])),
            encode_text("ReferencedSOPInstanceUID", volume.sop_instance_uids[k]),
        ])])
        for k in range(n_slices)
    ]
    roi_items, contour_items, observation_items = [], [], []
    for number, (name, definition) in enumerate(zip(masks, defs), start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = volume.frame_of_reference_uid
        roi.ROIName = definition.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = generation
        roi_items.append(roi)

        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(definition.rgb)
        roi_contour.ReferencedROINumber = number
        mask = np.asarray(masks[name])
        contours = _contour_items(mask if mask.dtype == np.bool_ else mask != 0, volume, slice_z, slice_images)
        if contours:
            put_sequence(roi_contour, "ContourSequence", contours)
            logger.info("RTSTRUCT ROI %d %s: %d contours", number, definition.name, len(contours))
        else:
            logger.warning("RTSTRUCT ROI %d %s: mask is empty; written without contours", number, definition.name)
        contour_items.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.ROIObservationLabel = definition.name
        observation.RTROIInterpretedType = definition.rt_roi_interpreted_type
        observation.ROIInterpreter = ""
        observation_items.append(observation)

    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    # Approval
    ds.ApprovalStatus = "UNAPPROVED"

    # built here, no ambiguous VR: written as it is, the pre-encoded contours untouched
    mark_explicit_little(ds)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _referenced_frame(volume: Volume, study_uid: str) -> Dataset:
    """Frame of reference -> study -> series -> every CT slice."""
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid
    series.ContourImageSequence = DicomSequence(
        [_image_ref(ds, uid) for ds, uid in zip(volume.datasets, volume.sop_instance_uids)]
    )
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = study_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = volume.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _contour_items(
    mask: np.ndarray, volume: Volume, slice_z: Sequence[str], slice_images: Sequence[bytes]
) -> list[bytes]:
    """The Contour Sequence items of one structure, encoded (``dicom_elements.encode_item``).

    Encoded directly: an External alone has hundreds of contours and ~100 000 DS values,
    and a pydicom dataset per item (and pydicom's value checks) would cost seconds.  The
    values are our own, in a known-valid form: (x, y) with 3 decimals, z the slice's text.
    """
    items: list[bytes] = []
    # trace the structure inside its bounding box only, all its slices at once
    box = bounding_box(mask)
    if box is None:
        return items
    traced = trace_slices(mask[box])
    origin_rc = (box[1].start, box[2].start)
    closed_planar = encode_text("ContourGeometricType", "CLOSED_PLANAR")
    for k_box in sorted(traced):
        k = box[0].start + k_box
        for rc in traced[k_box]:
            points = _to_patient(rc, volume.affine, k, origin_rc)
            items.append(encode_item([
                slice_images[k],
                closed_planar,
                encode_text("NumberOfContourPoints", str(len(points))),
                encode_text("ContourNumber", str(len(items) + 1)),
                # every point exactly on the slice's plane: (x, y) formatted, z the slice's own text
                encode_text("ContourData", format_contour_data(points[:, :2], slice_z[k])),
            ]))
    return items
