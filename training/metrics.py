"""Segmentation metrics in millimetres, on a patient's own grid (numpy/SciPy only).

* ``dice``: volumetric overlap.
* ``surface_dice``: the fraction of both surfaces lying within ``tolerance_mm`` of the
  other surface (Nikolov et al. 2021, "surface DSC"), surfaces taken as the boundary
  voxels of each mask (voxels with a 6-neighbour outside it) and distances measured
  between voxel centres with the grid's spacing.
* ``hd95``: the 95th percentile Hausdorff distance, the larger of the two directed 95th
  percentiles of boundary-to-boundary distances (as MONAI's
  ``compute_hausdorff_distance(percentile=95)``).

Distances use exact Euclidean distance transforms (``scipy.ndimage.distance_transform_edt``
with ``sampling`` = spacing) inside the bounding box of both masks plus a margin, so a
small organ on a large grid costs little.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["dice", "surface_dice", "hd95", "surface_distances", "restrict_to_slices"]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; 1.0 when both are empty."""
    s = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / s) if s else 1.0


def _boundary(m: np.ndarray) -> np.ndarray:
    return m & ~ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(distances in mm from each boundary voxel of ``a`` to ``b``'s boundary, and back).

    Both masks must be non-empty.
    """
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    both = a | b
    idx = np.argwhere(both)
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, both.shape)
    box = tuple(slice(x, y) for x, y in zip(lo, hi))
    ba, bb = _boundary(a[box]), _boundary(b[box])
    da = ndimage.distance_transform_edt(~bb, sampling=spacing_zyx)
    db = ndimage.distance_transform_edt(~ba, sampling=spacing_zyx)
    return da[ba], db[bb]


def surface_dice(a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, float, float], tolerance_mm: float) -> float:
    """Surface Dice at ``tolerance_mm``; 1.0 when both are empty, 0.0 when one is."""
    if not a.any() and not b.any():
        return 1.0
    if not a.any() or not b.any():
        return 0.0
    d_ab, d_ba = surface_distances(a, b, spacing_zyx)
    return float(((d_ab <= tolerance_mm).sum() + (d_ba <= tolerance_mm).sum()) / (len(d_ab) + len(d_ba)))


def hd95(a: np.ndarray, b: np.ndarray, spacing_zyx: tuple[float, float, float]) -> float:
    """95th percentile Hausdorff distance in mm; NaN when either mask is empty."""
    if not a.any() or not b.any():
        return float("nan")
    d_ab, d_ba = surface_distances(a, b, spacing_zyx)
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def restrict_to_slices(pred: np.ndarray, ref: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Both masks with every slice outside the reference's first..last slice emptied.

    How the AAPM 2017 thoracic challenge scored cord and esophagus: the reference was
    contoured over a clinician-chosen length, and what the model finds beyond it is not
    an error.  An empty reference leaves both unchanged.
    """
    other = tuple(a for a in range(ref.ndim) if a != axis)
    zs = np.flatnonzero(ref.any(other))
    if not len(zs):
        return pred, ref
    keep = np.zeros(ref.shape[axis], bool)
    keep[zs[0] : zs[-1] + 1] = True
    shape = [1] * ref.ndim
    shape[axis] = -1
    keep = keep.reshape(shape)
    return pred & keep, ref & keep
