"""Reading DICOM-SEG and RTSTRUCT objects (ours or another's) back onto a Volume.

The app only writes (``autocontour.dicom_seg``, ``autocontour.rtstruct``); these readers
are what the tests, the conformance checks and the benchmark use to check what was
written, and they accept clinical objects too.  Both refuse an object in another frame
of reference than the CT, or one that does not lie on the CT's grid, with a
``GeometryError``; neither ever resamples or moves a contour.

RTSTRUCT (``rtstruct_contours``, ``contours_to_mask``, ``rasterise_rtstruct``)
    Each CLOSED_PLANAR contour is mapped to fractional ``(k, j, i)`` indices with the
    inverse affine, assigned to the slice whose position is within half a slice spacing,
    and the contours of one slice are combined by the even-odd rule (XOR of polygon
    fills).  A pixel is inside when its centre is inside.  Contours that lie on no slice
    of the volume are reported, never silently moved.  Because marching-squares vertices
    lie halfway between a pixel centre inside and one outside, ``build_rtstruct``
    followed by ``rasterise_rtstruct`` gives back the mask exactly.

SEG (``read_seg_masks``)
    highdicom (imported when first used) decodes the frames; they are placed by the CT
    slice they reference, or else by their plane positions, which must lie on the
    volume's grid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from autocontour.dicom_seg import SEG_STORAGE_UIDS
from autocontour.errors import GeometryError
from autocontour.volume import Volume

if TYPE_CHECKING:  # highdicom is imported by the SEG reader only, when it is first used
    import highdicom as hd

logger = logging.getLogger(__name__)

__all__ = [
    "OffSliceContour", "rtstruct_contours", "contours_to_mask", "fill_polygon", "rasterise_rtstruct", "read_seg_masks",
]


# --------------------------------------------------------------------------- RTSTRUCT


@dataclass(frozen=True)
class OffSliceContour:
    """A contour that could not be put on a slice of the volume, and why."""

    roi_name: str
    contour_index: int  # position in the ROI's Contour Sequence
    z: float  # mean z (LPS) of its points
    reason: str


def rtstruct_contours(
    ds_rtstruct: Dataset, volume: Volume
) -> tuple[dict[str, dict[int, list[np.ndarray]]], list[OffSliceContour]]:
    """CLOSED_PLANAR contours of every ROI, grouped by the slice of ``volume`` they lie on.

    A contour belongs to slice ``k`` when all its points are within half a slice
    spacing of that slice's plane.  Contours of other geometric types, contours on no
    slice of the volume and non-planar contours are returned in the second list.

    Returns:
        ``{roi_name: {k: [(N, 3) LPS points, ...]}}`` (every ROI of the Structure Set
        ROI Sequence is present, possibly with no contours), and the contours left out.
    """
    names = {}
    for roi in ds_rtstruct.get("StructureSetROISequence", []):
        name = str(getattr(roi, "ROIName", "") or f"ROI_{roi.ROINumber}")
        if name in names.values():
            name = f"{name}#{roi.ROINumber}"
            logger.warning("RTSTRUCT has two ROIs named %r; reading ROI %s as %r", roi.ROIName, roi.ROINumber, name)
        names[int(roi.ROINumber)] = name
    inverse = np.linalg.inv(volume.affine)
    n_slices = volume.array.shape[0]
    by_roi: dict[str, dict[int, list[np.ndarray]]] = {name: {} for name in names.values()}
    left_out: list[OffSliceContour] = []
    for roi_contour in ds_rtstruct.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        name = names.get(number)
        if name is None:
            name = f"ROI_{number}"
            logger.warning("ROI Contour Sequence refers to ROI %d, absent from Structure Set ROI Sequence", number)
            by_roi.setdefault(name, {})
        for index, contour in enumerate(roi_contour.get("ContourSequence", [])):
            values = np.asarray([float(v) for v in contour.get("ContourData", [])], dtype=float)
            if values.size == 0:
                continue
            if values.size % 3:
                left_out.append(OffSliceContour(name, index, float("nan"), "ContourData is not (x, y, z) triplets"))
                continue
            points = values.reshape(-1, 3)
            z = float(points[:, 2].mean())
            kind = str(getattr(contour, "ContourGeometricType", ""))
            if kind != "CLOSED_PLANAR":
                left_out.append(OffSliceContour(name, index, z, f"geometric type {kind or 'missing'} is not filled"))
                continue
            k_frac = points @ inverse[0, :3] + inverse[0, 3]
            k_all = np.floor(k_frac + 0.5).astype(int)
            k = int(k_all[0])
            if (k_all != k).any():
                left_out.append(OffSliceContour(name, index, z, "points lie on more than one slice (not planar)"))
            elif not 0 <= k < n_slices:
                left_out.append(OffSliceContour(name, index, z, "on no slice of the volume"))
            else:
                by_roi[name].setdefault(k, []).append(points)
    return by_roi, left_out


def fill_polygon(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside the closed polygon (``rows``, ``cols``), by scanlines.

    The same pixels as ``skimage.draw.polygon`` (a point-in-polygon test per pixel of the
    polygon's bounding box, ~1 s for a 600-point body outline on a 512 x 512 slice), in
    O(edges x rows): each edge crosses the pixel-centre rows ``y`` with
    ``min(r0, r1) <= y < max(r0, r1)`` (half-open, so a vertex on a row counts once), the
    crossings of a row are sorted and paired, and the centres strictly between a pair are
    inside.  Centres exactly on an edge are ambiguous for any fill; marching-squares
    outlines (``mask_to_contours``) never pass through one.
    """
    n_rows, n_cols = shape
    r0 = np.asarray(rows, float)
    c0 = np.asarray(cols, float)
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    lo, hi = np.minimum(r0, r1), np.maximum(r0, r1)
    first = np.maximum(np.ceil(lo), 0).astype(np.int64)  # first row y >= lo
    stop = np.minimum(np.ceil(hi), n_rows).astype(np.int64)  # rows y < hi
    count = np.maximum(stop - first, 0)
    out = np.zeros(shape, bool)
    if count.sum() == 0:
        return out
    edge = np.repeat(np.arange(len(r0)), count)
    y = np.repeat(first, count) + (np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count))
    x = c0[edge] + (y - r0[edge]) * (c1[edge] - c0[edge]) / (r1[edge] - r0[edge])
    order = np.lexsort((x, y))
    y, x = y[order], x[order]
    # a polygon closed within the rows crosses each row an even number of times; rows cut by
    # the image's top or bottom edge are complete too (all of a row's crossings are kept)
    start = np.clip(np.floor(x[0::2]).astype(np.int64) + 1, 0, n_cols)
    end = np.clip(np.ceil(x[1::2]).astype(np.int64), 0, n_cols)
    keep = end > start
    if not keep.any():
        return out
    row, start, end = y[0::2][keep], start[keep], end[keep]
    r_lo, r_hi, c_lo, c_hi = int(row.min()), int(row.max()) + 1, int(start.min()), int(end.max())
    marks = np.zeros((r_hi - r_lo, c_hi - c_lo + 1), np.int32)  # the filled spans' bounding box only
    np.add.at(marks, (row - r_lo, start - c_lo), 1)
    np.add.at(marks, (row - r_lo, end - c_lo), -1)
    out[r_lo:r_hi, c_lo:c_hi] = np.cumsum(marks, axis=1)[:, :-1] > 0
    return out


def contours_to_mask(
    contours_by_k: Mapping[int, Sequence[np.ndarray]], shape: tuple[int, int, int], affine: np.ndarray
) -> np.ndarray:
    """Fill planar LPS contours into a (k, j, i) mask by the even-odd rule.

    The contours of one slice are XOR-ed, so a contour inside another is a hole and a
    contour inside a hole is an island.  A pixel is inside when its centre is.

    Args:
        contours_by_k: slice index -> (N, 3) LPS polygons on that slice.
        shape: (slices, rows, columns) of the mask.
        affine: 4x4 index (k, j, i, 1) -> LPS of the volume.
    """
    inverse = np.linalg.inv(np.asarray(affine, dtype=float))
    mask = np.zeros(shape, dtype=bool)
    for k, contours in contours_by_k.items():
        for points in contours:
            kji = np.asarray(points, dtype=float) @ inverse[:3, :3].T + inverse[:3, 3]
            mask[k] ^= fill_polygon(kji[:, 1], kji[:, 2], shape[1:])
    return mask


def rasterise_rtstruct(
    ds_rtstruct: Dataset | str | Path, volume: Volume, *, strict: bool = False
) -> dict[str, np.ndarray]:
    """Masks ``{ROIName: (k, j, i) bool array}`` of an RTSTRUCT on the grid of ``volume``.

    Contours that lie on no slice of the volume (or are not CLOSED_PLANAR) are logged,
    one warning per ROI; with ``strict=True`` they raise instead.

    Args:
        ds_rtstruct: the RTSTRUCT dataset, or a path to read it from.
        volume: the CT the contours are drawn on.

    Raises:
        GeometryError: ``strict`` and some contours could not be placed; or the RTSTRUCT
            refers to another frame of reference than the CT's.
    """
    if not isinstance(ds_rtstruct, Dataset):
        ds_rtstruct = pydicom.dcmread(ds_rtstruct)
    frames = {
        str(item.FrameOfReferenceUID)
        for item in ds_rtstruct.get("ReferencedFrameOfReferenceSequence", [])
        if "FrameOfReferenceUID" in item
    }
    if volume.frame_of_reference_uid and frames and volume.frame_of_reference_uid not in frames:
        raise GeometryError(
            f"RTSTRUCT {ds_rtstruct.get('SOPInstanceUID', '?')} is in frame of reference {sorted(frames)}, "
            f"the CT in {volume.frame_of_reference_uid} - contours cannot be placed on this CT"
        )
    by_roi, left_out = rtstruct_contours(ds_rtstruct, volume)
    if left_out:
        per_roi: dict[tuple[str, str], list[float]] = {}
        for item in left_out:
            per_roi.setdefault((item.roi_name, item.reason), []).append(item.z)
        for (name, reason), zs in per_roi.items():
            logger.warning(
                "RTSTRUCT ROI %s: %d contours ignored (%s; z %.2f..%.2f mm)", name, len(zs), reason, min(zs), max(zs)
            )
        if strict:
            raise GeometryError(
                f"{len(left_out)} RTSTRUCT contours could not be placed on the CT's slices "
                f"(first: ROI {left_out[0].roi_name}, z {left_out[0].z:.2f} mm, {left_out[0].reason})"
            )
    shape = volume.array.shape
    return {name: contours_to_mask(by_k, shape, volume.affine) for name, by_k in by_roi.items()}


# --------------------------------------------------------------------------- SEG


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
        ValueError: ``ds`` is not a Segmentation.
        GeometryError: the SEG is in another frame of reference than the CT, or its
            frames lie off the volume's grid (as ``rasterise_rtstruct``).
    """
    if str(getattr(ds, "SOPClassUID", "")) not in SEG_STORAGE_UIDS:
        raise ValueError(f"not a DICOM Segmentation (SOP class {getattr(ds, 'SOPClassUID', 'missing')})")
    seg_for = str(getattr(ds, "FrameOfReferenceUID", ""))
    if volume.frame_of_reference_uid and seg_for and seg_for != volume.frame_of_reference_uid:
        raise GeometryError(
            f"SEG frame of reference {seg_for} differs from the CT's {volume.frame_of_reference_uid}: "
            "the segmentation was not made on this CT"
        )
    import highdicom as hd

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
            raise GeometryError(f"the SEG's frames do not lie on the CT's voxel grid ({exc})") from exc
    if stack.ndim == 3:  # a single segment may come back without the segment axis
        stack = stack[..., np.newaxis]
    return {labels[n]: np.ascontiguousarray(stack[..., s], dtype=bool) for s, n in enumerate(numbers)}
