"""Write the contours as a DICOM Segmentation (SEG), and read any SEG back onto a Volume.

The writer uses highdicom.  Choices, and why:

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
  slice's ImagePositionPatient; the plane geometry is never recomputed.  The SEG still
  references every slice of the CT series (Referenced Series / Source Image Sequence).
* Native (uncompressed) transfer syntax: BINARY frames are bit-packed (1 bit/pixel), so
  compression would cost time for little gain.

The CT headers in ``Volume.datasets`` lack PixelData; highdicom needs only the metadata
(Rows, Columns, PixelSpacing, ImageOrientationPatient, ImagePositionPatient, patient
and study attributes), which they keep.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.valuerep import DSfloat

from autocontour.structures import STRUCTURES, Code, StructureDefinition, structure
from autocontour.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["build_seg", "read_seg_masks", "cielab_color", "CONTENT_LABEL"]

CONTENT_LABEL = "AUTOSEG"
DEFAULT_MANUFACTURER = "autocontour"
DEFAULT_MODEL_NAME = "autocontour head-and-neck auto-segmentation"
DEFAULT_CONTENT_CREATOR = "AUTOCONTOUR^"  # PN: family name only (trailing caret)
SEG_STORAGE_UIDS = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")


def _coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def cielab_color(rgb: tuple[int, int, int]) -> hd.color.CIELabColor:
    """The table's sRGB colour as the CIELab value DICOM stores (RecommendedDisplayCIELabValue)."""
    return hd.color.CIELabColor.from_rgb(*rgb)


def _segment_description(
    number: int, definition: StructureDefinition, algorithm: hd.AlgorithmIdentificationSequence
) -> hd.seg.SegmentDescription:
    desc = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=definition.name,
        segmented_property_category=_coded(definition.category),
        segmented_property_type=_coded(definition.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=cielab_color(definition.rgb),
    )
    lat = definition.laterality_code
    if lat is not None:
        # highdicom has no argument for it: Segmented Property Type Modifier Code Sequence
        # (0062,0011) is nested in the Segmented Property Type Code Sequence item, BCID 244.
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = DicomSequence(
            [_coded(lat)]
        )
    return desc


def _ordered_structures(masks: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> list[StructureDefinition]:
    for name, mask in masks.items():
        structure(name)  # KeyError listing the valid names
        if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_:
            raise TypeError(f"mask {name!r} must be a boolean numpy array, got {getattr(mask, 'dtype', type(mask))}")
        if mask.shape != shape:
            raise ValueError(f"mask {name!r} has shape {mask.shape}, the volume has {shape} (k, j, i)")
    return [s for s in STRUCTURES if s.name in masks]


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
) -> pydicom.Dataset:
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
        A ``highdicom.seg.Segmentation`` (a ``pydicom.Dataset``) with fresh Series/SOP
        Instance UIDs; patient and study attributes are copied from the CT.  Write it
        with ``save_as``.

    Raises:
        KeyError: a name is not in the structure table.
        TypeError, ValueError: a mask is not boolean or not on the volume's grid; no
            masks; the volume has no source headers for its slices.
    """
    t0 = time.perf_counter()
    shape = tuple(volume.array.shape)
    if not masks:
        raise ValueError("no masks to write: pass at least one structure")
    if len(volume.datasets) != shape[0] or len(volume.sop_instance_uids) != shape[0]:
        raise ValueError(
            f"volume has {shape[0]} slices but {len(volume.datasets)} headers / "
            f"{len(volume.sop_instance_uids)} SOP instance UIDs; build it with build_volume"
        )
    defs = _ordered_structures(masks, shape)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [_segment_description(n, d, algorithm) for n, d in enumerate(defs, start=1)]

    # (frames, rows, cols, segments) in the volume's k order = the order of the source images.
    # Stored segment-major and handed over as a transposed view: highdicom's per-frame
    # reads (frame k, segment s) and its overlap check then run on contiguous memory
    # (3-4x faster than a C-ordered 4D array on a 132x512x512 CT).
    # Only slices holding some structure are passed to highdicom (and stacked: the full
    # (S, K, R, C) stack of a 512 x 512 CT costs ~35 MB per structure); all slices are then
    # referenced (see _reference_all_slices), so the SEG names the whole CT series.
    occupied_any = np.zeros(shape[0], bool)
    for d in defs:
        occupied_any |= np.asarray(masks[d.name]).reshape(shape[0], -1).any(axis=1)
    occupied = np.flatnonzero(occupied_any)
    if occupied.size == 0:
        logger.warning("all %d masks are empty; the SEG will hold one empty frame", len(defs))
        occupied = np.array([0])
    # filled in place, one block copy per run of consecutive occupied slices (fancy
    # indexing and np.stack would copy every mask twice, np.take(out=) is slower still)
    stacked = np.empty((len(defs), occupied.size, *shape[1:]), np.uint8)  # (S, F, R, C)
    breaks = np.flatnonzero(np.diff(occupied) > 1) + 1
    runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(occupied, breaks)]
    for i, d in enumerate(defs):
        m = np.asarray(masks[d.name]).view(np.uint8)
        f = 0
        for k0, k1 in runs:
            stacked[i, f : f + k1 - k0] = m[k0:k1]
            f += k1 - k0
    pixels = np.moveaxis(stacked, 0, -1)  # (frames, R, C, S) view
    source = [volume.datasets[k] for k in occupied]

    seg = hd.seg.Segmentation(
        source_images=source,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=manufacturer_model_name,
        software_versions=algorithm_version,
        device_serial_number=device_serial_number,
        content_description=content_description,
        content_creator_name=content_creator_name,
        content_label=CONTENT_LABEL,
        series_description=series_description,
        institution_name=institution_name,
        omit_empty_frames=True,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    _reference_all_slices(seg, volume)
    _fix_inherited_attributes(seg, volume)
    logger.info(
        "DICOM-SEG: %d segments, %d frames on %d CT slices (%.2f s)",
        len(defs), int(seg.NumberOfFrames), shape[0], time.perf_counter() - t0,
    )
    return seg


def _reference_all_slices(seg: Dataset, volume: Volume) -> None:
    """Source Image Sequence and Referenced Series Sequence listing every CT slice, in k order.

    highdicom lists the source images it was given (the occupied slices only); its
    ``further_source_images`` would list the rest but re-checks each one against the IOD
    tables (~4 ms a slice), so the same two sequences are written here directly.
    """
    refs = []
    for ds in volume.datasets:
        ref = Dataset()
        ref.ReferencedSOPClassUID = ds.SOPClassUID
        ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        refs.append(ref)
    seg.SourceImageSequence = refs
    series = Dataset()
    series.SeriesInstanceUID = volume.series_instance_uid or volume.datasets[0].SeriesInstanceUID
    series.ReferencedInstanceSequence = [copy.copy(r) for r in refs]
    seg.ReferencedSeriesSequence = [series]


def _fix_inherited_attributes(seg: Dataset, volume: Volume) -> None:
    """Repair what highdicom copies verbatim from the CT headers and the standard forbids.

    * SpacingBetweenSlices: copied from the first CT slice, where some scanners (Philips)
      write a negative value; the Pixel Measures macro requires a positive one.  The
      volume's measured slice step is exact for the SEG's frames, which lie on the CT's
      slices.
    * Referenced Study Sequence (General Study module, Type 3): anonymisation often
      blanks its Referenced SOP Class UID, which is Type 1 inside the item; items that
      are not complete are dropped.
    """
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.SpacingBetweenSlices = DSfloat(float(volume.spacing[0]), auto_format=True)
    if "ReferencedStudySequence" in seg:
        kept = [
            item for item in seg.ReferencedStudySequence
            if item.get("ReferencedSOPClassUID") and item.get("ReferencedSOPInstanceUID")
        ]
        if kept:
            seg.ReferencedStudySequence = kept
        else:
            del seg.ReferencedStudySequence


def _frame_group(ds: Dataset, index: int, name: str) -> Dataset | None:
    """Item of functional group ``name`` for frame ``index`` (per-frame, else shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame) and per_frame[index].get(name):
        return per_frame[index].get(name)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(name):
        return shared[0].get(name)[0]
    return None


def _frames_on_referenced_slices(ds: Dataset, volume: Volume, tol_mm: float = 0.01) -> bool:
    """Whether every frame references one slice of ``volume`` and lies exactly on it.

    Checks, per frame: a Derivation Image reference to a slice of this CT, spatial
    locations not declared changed, the frame's orientation, pixel spacing and position
    equal to that slice's (``tol_mm``), and the SEG's Rows/Columns equal to the CT's.
    """
    rows, cols = volume.array.shape[1:]
    if int(ds.get("Rows", 0)) != rows or int(ds.get("Columns", 0)) != cols:
        return False
    index_of = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    n_frames = int(ds.get("NumberOfFrames", 1))
    for f in range(n_frames):
        derivation = _frame_group(ds, f, "DerivationImageSequence")
        sources = [] if derivation is None else list(derivation.get("SourceImageSequence", []))
        ks = [index_of[str(src.ReferencedSOPInstanceUID)] for src in sources
              if str(src.ReferencedSOPInstanceUID) in index_of]
        if len(ks) != 1 or any(str(src.get("SpatialLocationsPreserved", "YES")) == "NO" for src in sources):
            return False
        ct = volume.datasets[ks[0]]
        position = _frame_group(ds, f, "PlanePositionSequence")
        orientation = _frame_group(ds, f, "PlaneOrientationSequence")
        measures = _frame_group(ds, f, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            return False
        if not (
            np.allclose(np.array(position.ImagePositionPatient, float), np.array(ct.ImagePositionPatient, float),
                        atol=tol_mm, rtol=0)
            and np.allclose(np.array(orientation.ImageOrientationPatient, float),
                            np.array(ct.ImageOrientationPatient, float), atol=1e-4, rtol=0)
            and np.allclose(np.array(measures.PixelSpacing, float), np.array(ct.PixelSpacing, float),
                            atol=1e-4, rtol=0)
        ):
            return False
    return True


def _unique_labels(seg: hd.seg.Segmentation) -> dict[int, str]:
    labels: dict[int, str] = {}
    seen: set[str] = set()
    for number in seg.segment_numbers:
        label = str(seg.get_segment_description(number).SegmentLabel)
        if label in seen:
            logger.warning("SEG has two segments labelled %r; naming segment %d %r", label, number, f"{label}_{number}")
            label = f"{label}_{number}"
        seen.add(label)
        labels[number] = label
    return labels


def read_seg_masks(ds: Dataset, volume: Volume) -> dict[str, np.ndarray]:
    """The segments of a SEG (ours or another's) as boolean masks on ``volume``'s grid.

    Frames are placed by the CT slice they reference when every frame references a slice
    of ``volume`` (exact, the usual case); otherwise by their plane positions, which must
    lie on the volume's grid (transposes/flips/crop/pad only, never resampling).

    Returns:
        ``{SegmentLabel: mask}``, masks of shape ``volume.array.shape`` in (k, j, i) order,
        in segment-number order.

    Raises:
        ValueError: not a Segmentation, another frame of reference, or frames off the
            volume's grid.
    """
    if str(getattr(ds, "SOPClassUID", "")) not in SEG_STORAGE_UIDS:
        raise ValueError(f"not a DICOM Segmentation (SOP class {getattr(ds, 'SOPClassUID', 'missing')})")
    seg_for = str(getattr(ds, "FrameOfReferenceUID", ""))
    if volume.frame_of_reference_uid and seg_for and seg_for != volume.frame_of_reference_uid:
        raise ValueError(
            f"SEG frame of reference {seg_for} differs from the CT's {volume.frame_of_reference_uid}: "
            "the segmentation was not made on this CT"
        )
    seg = ds if isinstance(ds, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(ds, copy=True)
    labels = _unique_labels(seg)
    numbers = list(labels)
    shape = tuple(volume.array.shape)
    if _frames_on_referenced_slices(seg, volume):
        stack = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(volume.sop_instance_uids),
            segment_numbers=numbers,
            # omitted (empty) frames: those slices are empty, not an error
            assert_missing_frames_are_empty=True,
            # checked above, frame by frame (many writers leave SpatialLocationsPreserved out)
            ignore_spatial_locations=True,
            skip_overlap_checks=True,
            dtype=np.bool_,
        )
    else:
        logger.info("SEG frames are not all on referenced slices of this CT; placing them by plane position")
        geometry = hd.VolumeGeometry(
            affine=volume.affine,
            spatial_shape=shape,
            coordinate_system="PATIENT",
            frame_of_reference_uid=volume.frame_of_reference_uid or None,
        )
        try:
            seg_volume = seg.get_volume(segment_numbers=numbers, skip_overlap_checks=True, dtype=np.bool_)
            stack = seg_volume.match_geometry(geometry).array
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"the SEG's frames do not lie on the CT's voxel grid ({exc})") from exc
    if stack.ndim == 3:  # a single segment may come back without the segment axis
        stack = stack[..., np.newaxis]
    return {labels[n]: np.ascontiguousarray(stack[..., s], dtype=bool) for s, n in enumerate(numbers)}
