"""Clinical-constraint post-processing driven by the structure table.

Per structure: drop connected components below ``min_component_cc``, keep at most
``max_components`` of the largest, fill enclosed holes slice by slice, then check the
result (laterality, plausible volume).  Every removal is logged and counted in the
report; checks only raise flags, they never change the mask.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from autocontour.structures import Laterality, StructureDefinition, structure
from autocontour.volume import BODY_HU, Volume

logger = logging.getLogger(__name__)

__all__ = ["StructureResult", "bounding_box", "postprocess", "postprocess_structure", "laterality_flag"]

# 26-connectivity: touching at a corner is one component.
_CONNECTIVITY = np.ones((3, 3, 3), bool)


@dataclass
class StructureResult:
    name: str
    mask: np.ndarray
    volume_cc: float
    components_removed: int = 0
    removed_cc: float = 0.0
    holes_filled_cc: float = 0.0
    centroid_lps: tuple[float, float, float] | None = None
    flags: list[str] = field(default_factory=list)
    box: tuple[slice, ...] | None = None  # bounding box of the final mask (k, j, i)
    centroid_index: np.ndarray | None = None  # (k, j, i), fractional


def laterality_flag(defn: StructureDefinition, centroid_lps: np.ndarray, midline_x: float) -> str | None:
    """A flag if a lateral structure's centroid is on the wrong side of the patient.

    Patient left is +x in DICOM LPS; ``midline_x`` is the x of the patient's midline.
    """
    if defn.laterality is Laterality.NONE:
        return None
    dx = float(centroid_lps[0] - midline_x)
    if defn.laterality is Laterality.LEFT and dx <= 0:
        return f"laterality: {defn.name} centroid is {abs(dx):.1f} mm to the patient's RIGHT of the midline"
    if defn.laterality is Laterality.RIGHT and dx >= 0:
        return f"laterality: {defn.name} centroid is {abs(dx):.1f} mm to the patient's LEFT of the midline"
    return None


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for k in np.flatnonzero(mask.any((1, 2))):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding every True voxel (None if there is none), from axis projections.

    The first axis is found from each slice's ``any`` (contiguous rows); the others from
    one projection of the occupied slab, which is far cheaper than reducing the whole
    array once per axis.
    """
    first = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if first.size == 0:
        return None
    box = [slice(int(first[0]), int(first[-1]) + 1)]
    proj = mask[box[0]].any(axis=0)
    for axis in range(proj.ndim):
        other = tuple(a for a in range(proj.ndim) if a != axis)
        idx = np.flatnonzero(proj.any(axis=other)) if other else np.flatnonzero(proj)
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def postprocess_structure(mask: np.ndarray, defn: StructureDefinition, voxel_cc: float) -> StructureResult:
    """Apply the table's component and hole rules to one mask (k, j, i)."""
    res = StructureResult(defn.name, mask, 0.0)
    box = bounding_box(mask)
    if box is not None:
        # work in the bounding box: labelling a whole 512x512 volume is the slow part otherwise
        sub = mask[box]
        lab, n = ndimage.label(sub, structure=_CONNECTIVITY)
        if n:
            sizes = np.bincount(lab.ravel())[1:] * voxel_cc
            order = np.argsort(sizes)[::-1]
            keep = [i for i in order[: defn.max_components] if sizes[i] >= defn.min_component_cc]
            removed = [i for i in range(n) if i not in keep]
            if removed:
                res.components_removed = len(removed)
                res.removed_cc = float(sizes[removed].sum())
                logger.info(
                    "%s: removed %d component(s), %.2f cc (rule: keep %d largest >= %.2f cc)",
                    defn.name, len(removed), res.removed_cc, defn.max_components, defn.min_component_cc,
                )
            sub = np.isin(lab, np.array(keep) + 1)
            if defn.fill_holes:
                filled = _fill_holes_per_slice(sub)
                res.holes_filled_cc = float((filled & ~sub).sum() * voxel_cc)
                sub = filled
            mask = np.zeros(mask.shape, bool)  # calloc: untouched pages stay free
            mask[box] = sub
        res.volume_cc = float(sub.sum() * voxel_cc)
        if res.volume_cc:
            res.box = box
            res.centroid_index = np.array(ndimage.center_of_mass(sub)) + [b.start for b in box]
    res.mask = mask
    return res


def postprocess(volume: Volume, masks: dict[str, np.ndarray]) -> dict[str, StructureResult]:
    """Post-process every structure and attach flags (laterality, volume range, empty)."""
    voxel_cc = volume.voxel_volume_cc
    results = {}
    # midline: x of the body's centre of mass (the patient's own midline, not the image centre),
    # from every 4th voxel in each axis (plenty for a centre of mass)
    step = 4
    body = volume.array[::step, ::step, ::step] > BODY_HU
    midline_x = (
        float(volume.index_to_lps(np.array(ndimage.center_of_mass(body))[None] * step)[0, 0]) if body.any() else 0.0
    )
    for name, mask in masks.items():
        defn = structure(name)
        res = postprocess_structure(mask, defn, voxel_cc)
        if res.volume_cc == 0:
            res.flags.append("empty: structure not found")
        else:
            c = volume.index_to_lps(res.centroid_index[None])[0]
            res.centroid_lps = tuple(round(float(v), 2) for v in c)
            flag = laterality_flag(defn, c, midline_x)
            if flag:
                res.flags.append(flag)
            lo, hi = defn.volume_range_cc
            if not lo <= res.volume_cc <= hi:
                res.flags.append(f"volume {res.volume_cc:.1f} cc outside the plausible range {lo}-{hi} cc")
        for f in res.flags:
            logger.warning("%s: %s", name, f)
        results[name] = res
    return results
