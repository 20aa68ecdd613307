"""Chosen CT series -> ``Volume`` with exact geometry, or a GeometryError that says why.

What the SDK's DICOMSeriesToVolumeOperator gets wrong, done right here: slices are
sorted by their position along the slice normal (never by file name or InstanceNumber),
the slice step is measured from *all* positions and checked for uniformity (a missing
slice or uneven spacing is refused, not papered over), PixelSpacing is read as
(row spacing, column spacing) and never swapped, and each slice's own
RescaleSlope/Intercept is applied.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from autocontour.errors import GeometryError, InputError
from autocontour.series_selection import SeriesCandidate
from autocontour.volume import Volume

logger = logging.getLogger(__name__)

__all__ = ["build_volume", "SPACING_RELATIVE_TOLERANCE", "MAX_VOXELS"]

# Slice steps may differ from their median by this fraction (highdicom uses the same 1 %).
SPACING_RELATIVE_TOLERANCE = 1e-2
# Orientation vectors of all slices must agree to this.
ORIENTATION_TOLERANCE = 1e-4
# Largest volume accepted: 1200 slices of 512 x 512 (1.26 GB as float32).
MAX_VOXELS = 1200 * 512 * 512


def _rescale(ds, keyword: str, default: float, path: str) -> float:
    value = ds.get(keyword)
    try:
        value = default if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or (keyword == "RescaleSlope" and value == 0):
        raise InputError(f"{path}: {keyword} {ds.get(keyword)!r} is not a usable number - re-export the series")
    return value


def _decode(ds, path: str, shape: tuple[int, int]) -> np.ndarray:
    if "PixelData" not in ds:
        raise InputError(f"{path} has no pixel data (truncated or header-only file) - send the complete series")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing/unsupported decoders
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        why = " ".join(str(exc).split())[:200]  # one line
        raise InputError(
            f"cannot decode pixel data of {path} (transfer syntax {name}: {why}) - "
            "send it uncompressed or in JPEG 2000 / JPEG-LS / JPEG lossless / RLE / deflate"
        ) from exc
    if pixels.shape != shape:
        raise InputError(
            f"pixel data of {path} has shape {pixels.shape}, not one {shape[0]}x{shape[1]} greyscale frame - "
            "send a single-frame greyscale CT series"
        )
    slope = _rescale(ds, "RescaleSlope", 1.0, path)
    intercept = _rescale(ds, "RescaleIntercept", 0.0, path)
    out = pixels.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        if slope != 1.0:
            out *= slope
        if intercept != 0.0:
            out += intercept
    if (slope != 1.0 or intercept != 0.0) and not np.isfinite(out).all():
        raise InputError(
            f"{path}: RescaleSlope {slope:g} / RescaleIntercept {intercept:g} give values beyond float range - "
            "re-export the series"
        )
    return out


def build_volume(series: SeriesCandidate, threads: int = 4) -> Volume:
    """Sort, check and stack the slices of ``series`` into a HU volume with its affine.

    Raises:
        GeometryError: mixed orientation or pixel grid, two different images at one
            position, a missing slice or uneven spacing, a single-position series.
        InputError: pixel data cannot be decoded; the volume exceeds MAX_VOXELS.
    """
    uid = series.series_instance_uid
    datasets, paths = list(series.datasets), list(series.paths)
    # Exact duplicate files (same SOP Instance UID) are dropped with a warning.
    seen: dict[str, int] = {}
    keep = []
    for i, ds in enumerate(datasets):
        sop = str(ds.SOPInstanceUID)
        if sop in seen:
            logger.warning("series %s: %s is a copy of %s (same SOPInstanceUID); using one", uid, paths[i], paths[seen[sop]])
            continue
        seen[sop] = i
        keep.append(i)
    datasets = [datasets[i] for i in keep]
    paths = [paths[i] for i in keep]
    try:
        iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
        ipps = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
        spacings = np.array([[float(v) for v in ds.PixelSpacing] for ds in datasets])
        grids = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    except (AttributeError, TypeError, ValueError) as exc:
        raise GeometryError(
            f"series {uid}: a slice lacks a valid ImageOrientationPatient/ImagePositionPatient/PixelSpacing/Rows/"
            f"Columns ({' '.join(str(exc).split())}) - the series cannot be placed in the patient; re-export it "
            "from the scanner or TPS"
        ) from exc
    if iops.ndim != 2 or iops.shape[1] != 6 or ipps.shape[1] != 3 or spacings.shape[1] != 2:
        raise GeometryError(
            f"series {uid}: malformed ImageOrientationPatient/ImagePositionPatient/PixelSpacing - re-export the series"
        )
    if not (np.isfinite(iops).all() and np.isfinite(ipps).all() and np.isfinite(spacings).all()):
        raise GeometryError(
            f"series {uid}: non-finite ImageOrientationPatient/ImagePositionPatient/PixelSpacing values - "
            "re-export the series"
        )
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOLERANCE:
        raise GeometryError(f"series {uid}: slices have different orientations - send a single axial reconstruction")
    if len(grids) != 1 or np.abs(spacings - spacings[0]).max() > 1e-4:
        raise GeometryError(f"series {uid}: slices have different sizes or pixel spacings - send one reconstruction")
    row_cos, col_cos = iops[0, :3], iops[0, 3:]
    if not (np.isclose(np.linalg.norm(row_cos), 1, atol=1e-3) and np.isclose(np.linalg.norm(col_cos), 1, atol=1e-3)
            and abs(row_cos @ col_cos) < 1e-3):
        raise GeometryError(
            f"series {uid}: ImageOrientationPatient {iops[0].tolist()} is not two orthonormal vectors - "
            "re-export the series"
        )
    if min(spacings[0]) <= 0:
        raise GeometryError(
            f"series {uid}: PixelSpacing {spacings[0].tolist()} must be positive - re-export the series"
        )
    rows, cols = next(iter(grids))
    if rows < 1 or cols < 1:
        raise GeometryError(f"series {uid}: images of {rows}x{cols} pixels - re-export the series")
    normal = np.cross(row_cos, col_cos)
    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    # Positions must lie on the line through the first slice along the normal (no tilt).
    offsets = ipps[order] - ipps[order][0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if np.abs(in_plane).max() > 0.05 * max(spacings[0].min(), 1e-3) + 1e-3:
        raise GeometryError(
            f"series {uid}: slice positions drift in-plane by up to {np.abs(in_plane).max():.2f} mm "
            "(gantry tilt or sheared stack) - send a reconstruction without tilt"
        )
    steps = np.diff(dist)
    if len(dist) < 2:
        raise GeometryError(f"series {uid}: a single slice position cannot form a volume")
    dup = np.flatnonzero(steps < 1e-3)
    if dup.size:
        a, b = paths[order[dup[0]]], paths[order[dup[0] + 1]]
        raise GeometryError(
            f"series {uid}: {a} and {b} are two different images at the same position ({dist[dup[0]]:.2f} mm) - "
            "remove the duplicate or send one acquisition"
        )
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > SPACING_RELATIVE_TOLERANCE * step)
    if bad.size:
        j = bad[0]
        raise GeometryError(
            f"series {uid}: slice spacing is not uniform ({steps[j]:.3f} mm between positions {dist[j]:.2f} and "
            f"{dist[j + 1]:.2f} mm, median {step:.3f} mm): missing or extra slice - send the complete series"
        )
    # The affine's step is the mean one (first to last slice), and every slice must lie on that
    # grid: small per-step deviations must not add up to a misplaced slice.
    step = float(dist[-1] - dist[0]) / (len(dist) - 1)
    off_grid = np.abs(dist - (dist[0] + step * np.arange(len(dist))))
    if off_grid.max() > SPACING_RELATIVE_TOLERANCE * step + 1e-3:
        k = int(off_grid.argmax())
        raise GeometryError(
            f"series {uid}: slice {paths[order[k]]} lies {off_grid[k]:.3f} mm off a regular "
            f"{step:.3f} mm grid (slice spacing drifts) - send a reconstruction with uniform spacing"
        )
    if rows * cols * len(datasets) > MAX_VOXELS:
        raise InputError(
            f"series {uid}: {len(datasets)} slices of {rows}x{cols} exceed the memory budget "
            f"({MAX_VOXELS} voxels) - send the treatment-site range only"
        )
    sorted_ds = [datasets[i] for i in order]
    sorted_paths = [paths[i] for i in order]
    array = np.empty((len(sorted_ds), rows, cols), np.float32)

    def _fill(k: int) -> None:
        array[k] = _decode(sorted_ds[k], sorted_paths[k], (rows, cols))

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(_fill, range(len(sorted_ds))))
    for ds in sorted_ds:  # keep headers, free the (cached) pixel bytes
        if "PixelData" in ds:
            del ds.PixelData
        ds._pixel_array = None
    affine = np.eye(4)
    affine[:3, 2] = row_cos * spacings[0][1]  # i: along a row, step = column spacing
    affine[:3, 1] = col_cos * spacings[0][0]  # j: down a column, step = row spacing
    affine[:3, 0] = normal * step
    affine[:3, 3] = ipps[order][0]
    first = sorted_ds[0]
    logger.info(
        "volume %s: %d x %d x %d, spacing %.3f/%.3f/%.3f mm (slice/row/col)",
        uid, len(sorted_ds), rows, cols, step, spacings[0][0], spacings[0][1],
    )
    return Volume(
        array=array,
        affine=affine,
        series_instance_uid=uid,
        study_instance_uid=str(getattr(first, "StudyInstanceUID", "")),
        frame_of_reference_uid=str(getattr(first, "FrameOfReferenceUID", "")),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in sorted_ds),
        datasets=sorted_ds,
    )
