"""The External (body) contour: the patient's outer surface, from the CT alone.

No model: a threshold, an in-plane opening, connected components and hole filling
(SciPy), in four steps; tissue is ``HU > EXTERNAL_HU``:

1. **Where the patient is**, on a coarse in-plane grid (about ``COARSE_MM`` per pixel,
   every slice kept): the largest 3-D connected component of the tissue after a one-pixel
   in-plane erosion; only its bounding box (grown by three coarse pixels) is used, so
   the finer steps work on the patient's box, not on the couch's width.
2. **Separate the patient from what touches it**, on a medium grid (about
   ``MEDIUM_MM``): an in-plane erosion of ``OPEN_MM`` cuts the thin links between the
   patient and the thermoplastic mask, couch top, head-rest and board shells (a few mm
   thick, with foam or air between them and the skin) while the nose, chin and ears'
   roots survive it; the largest 3-D component of what is left, grown back by the
   erosion radius plus one pixel, is the region where the skin is traced.
3. **Trace the skin** at full resolution inside that region: tissue, and the largest
   face-connected (6-connected) component of it, so the External is one piece.  Objects
   outside the region (couch, head rest, boards, the mask where it stands off the skin)
   are left out; the mask where it lies on the skin joins the patient, as it does in a
   planning system's own body contour at the same threshold.
4. **Fill each slice's holes**: air enclosed by the patient on an axial slice (airways,
   lungs, oral cavity, sinuses) is inside the External; pieces of a slice smaller than
   ``MIN_ISLAND_MM2`` (dots of the mask on the skin, joined to the patient only through
   another slice) are dropped, so the RTSTRUCT has no speck contours.

``EXTERNAL_HU = -350`` is the usual body threshold of planning systems: fat (about -100 HU)
and skin are above it, air (-1000), the foam of head rests and couch tops (about -900)
and lung (-850) are below it (lung and airways are enclosed, so step 4 puts them inside).

All work is on the volume's own (k, j, i) grid with in-plane operations only, so it holds
for every axial orientation (HFS, HFP, FFS, FFP, decubitus) and for non-square pixels;
the mask has the volume's shape, so it carries the volume's affine.

``check_external`` is the External's own plausibility check (flags, never changes).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from autocontour.volume import Volume

logger = logging.getLogger(__name__)

__all__ = [
    "EXTERNAL_HU",
    "ExternalResult",
    "check_external",
    "external_mask",
    "fill_holes_per_slice",
]

EXTERNAL_HU = -350.0  # tissue above, air / foam / lung below (volume.BODY_HU, -400: any tissue or couch, for crops)
COARSE_MM = 4.0  # in-plane pixel size for finding where the patient is (subsampled by whole pixels)
MEDIUM_MM = 2.5  # in-plane pixel size for separating the patient from what touches it
OPEN_MM = 2.5  # in-plane erosion radius that cuts thin links (mask, shells); the nose and chin survive it
# plausibility: mean axial cross-section of a head-and-neck patient (head ~150-250 cm^2,
# neck ~100 cm^2, shoulders ~600-900 cm^2) widened generously
MEAN_AREA_RANGE_CM2 = (40.0, 1500.0)
MIN_ISLAND_MM2 = 20.0  # a separate piece of one slice smaller than this is a speck, not patient
# a slice whose External touches the image edge over more than this many mm is truncated
EDGE_CONTACT_MM = 10.0

_SIX = ndimage.generate_binary_structure(3, 1)
_IN_PLANE_4 = np.zeros((3, 3, 3), bool)
_IN_PLANE_4[1] = ndimage.generate_binary_structure(2, 1)
_IN_PLANE_8 = np.zeros((3, 3, 3), bool)
_IN_PLANE_8[1] = True


@dataclass
class ExternalResult:
    """The External mask (k, j, i) and what was found on the way."""

    mask: np.ndarray
    excluded_cc: float = 0.0  # about how much tissue-dense voxels (> EXTERNAL_HU) left out: couch, head rest, boards, mask
    holes_filled_cc: float = 0.0  # air enclosed by the patient, put inside
    seconds: float = 0.0
    flags: list[str] = field(default_factory=list)


def _shift_op(mask: np.ndarray, radius: tuple[int, int], grow: bool) -> np.ndarray:
    """In-plane erosion (``grow=False``) or dilation by a (2 rj + 1) x (2 ri + 1) rectangle.

    Separable: one pass per in-plane axis, each the AND (OR) of the mask shifted by up to
    ``r`` pixels either way; outside the image counts as background.
    """
    out = mask.copy()
    for axis, r in zip((1, 2), radius):
        if r <= 0:
            continue
        src = out.copy()
        for s in range(1, r + 1):
            hi = [slice(None)] * 3
            lo = [slice(None)] * 3
            hi[axis], lo[axis] = slice(s, None), slice(None, -s)
            if grow:
                out[tuple(hi)] |= src[tuple(lo)]
                out[tuple(lo)] |= src[tuple(hi)]
            else:
                out[tuple(hi)] &= src[tuple(lo)]
                out[tuple(lo)] &= src[tuple(hi)]
                edge_lo, edge_hi = [slice(None)] * 3, [slice(None)] * 3
                edge_lo[axis], edge_hi[axis] = slice(0, s), slice(-s, None)
                out[tuple(edge_lo)] = False
                out[tuple(edge_hi)] = False
    return out


def _largest_component(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (all False when ``mask`` is).

    Sizes are counted on every other row and column (a quarter of the voxels: the
    patient outnumbers anything else in its region a hundredfold); all voxels when that
    sample holds none.
    """
    labels, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return np.zeros(mask.shape, bool)
    if n == 1:
        return labels == 1
    sizes = np.bincount(labels[:, ::2, ::2].ravel(), minlength=n + 1)
    sizes[0] = 0
    if not sizes.any():
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        sizes[0] = 0
    return labels == sizes.argmax()


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Each axial slice's holes filled: ``ndimage.binary_fill_holes`` slice by slice (background
    4-connected, what touches the edge of the array is outside), with one labelling for all
    slices.  Also used for the organs (``postprocess``)."""
    background = np.pad(~mask, ((0, 0), (1, 1), (1, 1)), constant_values=True)
    labels, n = ndimage.label(background, structure=_IN_PLANE_4)
    enclosed = np.ones(n + 1, bool)
    enclosed[0] = False  # the mask itself
    enclosed[labels[:, 0, 0]] = False  # each slice's padding ring: the background reaching the edge
    return mask | enclosed[labels[:, 1:-1, 1:-1]]


def _fill_holes_and_drop_specks(mask: np.ndarray, min_island_px: int, chunk: int = 16) -> tuple[np.ndarray, int]:
    """Background enclosed by ``mask`` on its own axial slice becomes foreground, and
    pieces of a slice smaller than ``min_island_px`` (specks joined to the patient only
    through another slice: the mask's dots on the skin) are dropped.

    Labelled with in-plane connectivity (slices independent: background 4-, foreground
    8-connected), in chunks of ``chunk`` slices each cropped to its own in-plane extent (a
    head is far narrower than the shoulders); background components that touch the crop's
    edge are outside.  Returns the mask and the number of specks dropped.
    """
    out = mask.copy()
    dropped = 0
    for k0 in range(0, mask.shape[0], chunk):
        part = mask[k0 : k0 + chunk]
        js = np.flatnonzero(part.any(axis=(0, 2)))
        if js.size == 0:
            continue
        is_ = np.flatnonzero(part.any(axis=(0, 1)))
        box = (slice(None), slice(int(js[0]), int(js[-1]) + 1), slice(int(is_[0]), int(is_[-1]) + 1))
        filled = fill_holes_per_slice(part[box])
        labels, n = ndimage.label(filled, structure=_IN_PLANE_8)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes < min_island_px
        small[0] = False
        if small.any():
            dropped += int(small.sum())
            filled &= ~small[labels]
        out[k0 : k0 + chunk][box] = filled
    return out, dropped


def _steps(spacing: np.ndarray, target_mm: float) -> tuple[int, int]:
    """In-plane subsampling steps (whole pixels) that bring the pixels to about ``target_mm``."""
    return tuple(max(1, int(target_mm // float(s))) for s in spacing[1:])


def _full_box(region: np.ndarray, step: tuple[int, int], shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """Full-resolution bounding box of a region on a grid subsampled by ``step`` in-plane."""
    ks = np.flatnonzero(region.any(axis=(1, 2)))
    js = np.flatnonzero(region.any(axis=(0, 2)))
    is_ = np.flatnonzero(region.any(axis=(0, 1)))
    return (slice(int(ks[0]), int(ks[-1]) + 1),
            slice(int(js[0]) * step[0], min(shape[1], (int(js[-1]) + 1) * step[0])),
            slice(int(is_[0]) * step[1], min(shape[2], (int(is_[-1]) + 1) * step[1])))


def external_mask(volume: Volume) -> ExternalResult:
    """The patient's External (body) mask on ``volume``'s grid; see the module docstring.

    Returns an empty mask (flagged by ``check_external``) when no patient is found, e.g.
    a volume of air.
    """
    t0 = time.perf_counter()
    arr = volume.array
    shape = arr.shape
    spacing = volume.spacing  # (k, j, i) mm
    voxel_cc = volume.voxel_volume_cc

    # 1. where the patient is: the largest component of the coarse grid's tissue after a
    # COARSE_MM opening, grown back generously; only its bounding box is used
    step_c = _steps(spacing, COARSE_MM)
    coarse = arr[:, :: step_c[0], :: step_c[1]] > EXTERNAL_HU
    core = _largest_component(_shift_op(coarse, (1, 1), grow=False), _SIX)
    if not core.any():
        logger.warning("External: no patient found (nothing above %g HU survives a %g mm opening)", EXTERNAL_HU, COARSE_MM)
        return ExternalResult(np.zeros(shape, bool), seconds=time.perf_counter() - t0)
    box = _full_box(_shift_op(core, (3, 3), grow=True), step_c, shape)

    # 2. the patient's core on the medium grid inside that box: an OPEN_MM opening cuts the
    # thin links to what touches the patient; the core grown back by the opening radius plus
    # one pixel is the region where the skin is traced
    step = _steps(spacing, MEDIUM_MM)
    radius = tuple(max(1, int(round(OPEN_MM / (float(s) * f)))) for s, f in zip(spacing[1:], step))
    medium = arr[box][:, :: step[0], :: step[1]] > EXTERNAL_HU
    core = _largest_component(_shift_op(medium, radius, grow=False), _SIX)
    region = _shift_op(core, tuple(r + 1 for r in radius), grow=True)
    up = np.repeat(np.repeat(region, step[0], axis=1), step[1], axis=2)
    n_j, n_i = box[1].stop - box[1].start, box[2].stop - box[2].start
    up = up[:, :n_j, :n_i]

    # 3. the skin at full resolution: tissue in the region, one face-connected piece
    tissue = arr[box] > EXTERNAL_HU
    body = _largest_component(tissue & up, _SIX)
    k_box, j_box, i_box = box

    # 4. holes and specks of each slice
    min_px = max(1, int(np.ceil(MIN_ISLAND_MM2 / float(spacing[1] * spacing[2]))))
    filled, specks = _fill_holes_and_drop_specks(body, min_px)
    mask = np.zeros(shape, bool)
    mask[k_box, j_box, i_box] = filled
    holes = int(np.count_nonzero(filled & ~body))
    # tissue-dense voxels left out: exact in the box, from the coarse grid outside it (each
    # coarse pixel stands for step^2 voxels)
    outside_box = int(np.count_nonzero(coarse)) - int(np.count_nonzero(
        coarse[k_box, box[1].start // step_c[0] : -(-box[1].stop // step_c[0]),
               box[2].start // step_c[1] : -(-box[2].stop // step_c[1])]))
    excluded = int(np.count_nonzero(tissue)) - int(np.count_nonzero(body)) + max(0, outside_box) * step_c[0] * step_c[1]
    res = ExternalResult(mask, excluded_cc=excluded * voxel_cc, holes_filled_cc=holes * voxel_cc,
                         seconds=time.perf_counter() - t0)
    logger.info(
        "External: %.0f cc on %d of %d slices; %.0f cc of enclosed air put inside, %d specks dropped, %.0f cc of "
        "objects above %g HU left out (%.2f s)",
        np.count_nonzero(filled) * voxel_cc, int(np.count_nonzero(filled.any(axis=(1, 2)))), shape[0],
        res.holes_filled_cc, specks,
        res.excluded_cc, EXTERNAL_HU, res.seconds,
    )
    return res


def check_external(volume: Volume, mask: np.ndarray) -> list[str]:
    """Plausibility flags for an External mask on ``volume`` (never changes it).

    * empty;
    * a gap: a slice without External between slices with one;
    * truncated: the External runs along the image edge (field of view smaller than the
      patient) over more than ``EDGE_CONTACT_MM`` on some slices;
    * the mean axial cross-section outside ``MEAN_AREA_RANGE_CM2``.

    One component holds by construction (``external_mask`` keeps the largest and only
    fills holes), so it is tested, not checked at run time.
    """
    flags: list[str] = []
    per_slice = np.count_nonzero(mask, axis=(1, 2))
    occupied = np.flatnonzero(per_slice)
    if occupied.size == 0:
        return ["empty: no patient found above the body threshold"]
    gaps = [int(k) for k in range(occupied[0], occupied[-1] + 1) if per_slice[k] == 0]
    if gaps:
        flags.append(f"External missing on {len(gaps)} slice(s) between its first and last (k = {gaps[:5]})")
    spacing = volume.spacing
    pixel_cm2 = float(spacing[1] * spacing[2]) / 100.0
    mean_area = float(per_slice[occupied].mean()) * pixel_cm2
    lo, hi = MEAN_AREA_RANGE_CM2
    if not lo <= mean_area <= hi:
        flags.append(f"mean axial cross-section {mean_area:.0f} cm2 outside the plausible range {lo:g}-{hi:g} cm2")
    edge = np.zeros(mask.shape[0], float)
    for axis, sl, mm in ((1, 0, spacing[2]), (1, -1, spacing[2]), (2, 0, spacing[1]), (2, -1, spacing[1])):
        edge += np.count_nonzero(np.take(mask, sl, axis=axis), axis=1) * float(mm)
    truncated = np.flatnonzero(edge > EDGE_CONTACT_MM)
    if truncated.size:
        flags.append(
            f"External touches the image edge on {truncated.size} slice(s) (k {int(truncated[0])}-{int(truncated[-1])}): "
            "the patient is wider than the field of view there"
        )
    return flags
