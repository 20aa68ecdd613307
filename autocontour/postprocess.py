"""Clinical-constraint post-processing driven by the structure table.

First the External (the patient's outer surface, ``autocontour.external``), computed
from the CT; every target (GTV/CTV/ITV/PTV) is clipped to it, so no target voxel lies
outside the patient (counted and logged).  Then per structure: drop connected
components below ``min_component_cc``, keep at most ``max_components`` of the largest,
and of those only the clinically plausible ones (the stray-component rule,
``StructureDefinition``), fill enclosed holes slice by slice, then check the result
(laterality, plausible volume; the External has its own check).  Every removal is
logged and counted in the report; checks only raise flags, they never change the mask.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from autocontour.external import check_external, external_mask, fill_holes_per_slice
from autocontour.structures import EXTERNAL, STRUCTURES, Laterality, StructureDefinition, structure
from autocontour.volume import BODY_HU, Volume

logger = logging.getLogger(__name__)

__all__ = [
    "StructureResult", "bounding_box", "clip_to_external", "external_structure", "laterality_flag", "merge_structures",
    "midline_x", "postprocess", "postprocess_masks", "postprocess_structure",
]

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
    clipped_cc: float = 0.0  # target volume outside the External, removed
    added_from_contained_cc: float = 0.0  # voxels of a structure it contains by definition (nested PTVs), added
    removals: list[str] = field(default_factory=list)  # one line per removed component, with the reason
    excluded_cc: float = 0.0  # External only: objects above the body threshold left out (couch, head rest...)
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


def _gap_mm(labels: np.ndarray, main: int, other: int, spacing_mm: np.ndarray, limit_mm: float) -> float:
    """Smallest distance (mm, voxel centre to voxel centre) between components ``main`` and
    ``other`` of ``labels``; ``inf`` when it exceeds ``limit_mm``.

    Only ``main``'s voxels within ``limit_mm`` of ``other``'s bounding box are considered.
    """
    idx = np.argwhere(labels == other)
    margin = np.ceil(limit_mm / spacing_mm).astype(int) + 1
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = idx.max(0) + margin + 1
    near = np.argwhere(labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] == main) + lo
    if near.size == 0:
        return float("inf")
    # imported here, not at start-up: scipy.spatial costs ~0.2 s of the app's serial start, and
    # its first use is in a graph branch that runs beside the other model's inference
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(near * spacing_mm).query(idx * spacing_mm, k=1)
    gap = float(dist.min())
    return gap if gap <= limit_mm else float("inf")


def postprocess_structure(
    mask: np.ndarray, defn: StructureDefinition, voxel_cc: float, spacing_mm: Sequence[float] | None = None
) -> StructureResult:
    """Apply the table's component and hole rules to one mask (k, j, i).

    ``spacing_mm`` (k, j, i) is needed when a small secondary component must be judged
    by its distance to the largest (``StructureDefinition`` explains the rule).
    """
    res = StructureResult(defn.name, mask, 0.0)
    box = bounding_box(mask)
    if box is not None:
        # work in the bounding box: labelling a whole 512x512 volume is the slow part otherwise
        sub = mask[box]
        lab, n = ndimage.label(sub, structure=_CONNECTIVITY)
        if n:
            counts = np.bincount(lab.ravel())[1:]
            sizes = counts * voxel_cc
            order = np.argsort(sizes)[::-1]
            keep = [int(i) for i in order[: defn.max_components] if sizes[i] >= defn.min_component_cc]
            reasons = {
                int(i): f"{sizes[i]:.2f} cc: "
                + (f"below {defn.min_component_cc:g} cc" if sizes[i] < defn.min_component_cc
                   else f"beyond the {defn.max_components} largest")
                for i in range(n) if i not in keep
            }
            if len(keep) > 1:  # the stray-component rule
                largest = keep[0]
                for i in keep[1:]:
                    fraction = counts[i] / counts[largest]
                    if fraction >= defn.secondary_min_fraction:
                        continue
                    if spacing_mm is None:
                        raise ValueError(f"{defn.name}: spacing_mm is needed to judge a secondary component's distance")
                    gap = _gap_mm(lab, largest + 1, i + 1, np.asarray(spacing_mm, float), defn.secondary_max_gap_mm)
                    if gap <= defn.secondary_max_gap_mm:
                        continue
                    reasons[i] = (
                        f"{sizes[i]:.2f} cc stray component: {100 * fraction:.1f} % of the largest "
                        f"(< {100 * defn.secondary_min_fraction:g} %) and more than {defn.secondary_max_gap_mm:g} mm "
                        "from it"
                    )
                keep = [i for i in keep if i not in reasons]
            if reasons:
                removed = sorted(reasons)
                res.components_removed = len(removed)
                res.removed_cc = float(sizes[removed].sum())
                res.removals = [reasons[i] for i in sorted(reasons, key=lambda i: -sizes[i])]
                for line in res.removals:
                    logger.info("%s: removed a component, %s", defn.name, line)
                logger.info(
                    "%s: removed %d component(s), %.2f cc (rule: keep %d largest >= %.2f cc, secondary ones "
                    ">= %g %% of the largest or within %g mm)",
                    defn.name, len(removed), res.removed_cc, defn.max_components, defn.min_component_cc,
                    100 * defn.secondary_min_fraction, defn.secondary_max_gap_mm,
                )
            if keep:
                # the kept components' own box: a far-off removed speck no longer widens
                # what the hole filling and the centre of mass read
                objects = ndimage.find_objects(lab, max_label=max(keep) + 1)
                inner = tuple(
                    slice(min(objects[i][a].start for i in keep), max(objects[i][a].stop for i in keep))
                    for a in range(lab.ndim)
                )
                lab = lab[inner]
                box = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(box, inner))
            sub = np.isin(lab, np.array(keep) + 1)
            if defn.fill_holes:
                filled = fill_holes_per_slice(sub)
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


def _add_contained(outer: StructureResult, inner: StructureResult, voxel_cc: float) -> bool:
    """Add to ``outer`` the voxels of ``inner`` (a structure it contains by definition) it
    lacks; whether any were added."""
    if inner.box is None:
        return False
    missing = inner.mask[inner.box] & ~outer.mask[inner.box]
    n = int(np.count_nonzero(missing))
    if n == 0:
        return False
    mask = outer.mask.copy()
    mask[inner.box] |= missing
    outer.mask = mask
    outer.added_from_contained_cc += n * voxel_cc
    outer.volume_cc = float(np.count_nonzero(mask) * voxel_cc)
    outer.box = bounding_box(mask)
    outer.centroid_index = np.array(ndimage.center_of_mass(mask[outer.box])) + [b.start for b in outer.box]
    logger.info("%s: %d voxels (%.2f cc) of %s outside it added (%s lies inside it by definition)",
                outer.name, n, n * voxel_cc, inner.name, inner.name)
    return True


def clip_to_external(mask: np.ndarray, external: np.ndarray) -> tuple[np.ndarray, int]:
    """``mask`` without its voxels outside ``external``, and how many were removed."""
    box = bounding_box(mask)
    if box is None:
        return mask, 0
    outside = mask[box] & ~external[box]
    n = int(np.count_nonzero(outside))
    if n == 0:
        return mask, 0
    clipped = mask.copy()
    clipped[box] &= ~outside
    return clipped, n


def external_structure(volume: Volume) -> StructureResult:
    """The External of ``volume`` as a structure result: mask, volume, centre, its own flags.

    It needs the CT alone, so the app computes it beside the models (``ExternalOperator``)
    and hands it to ``postprocess``.
    """
    ext = external_mask(volume)
    res = StructureResult(EXTERNAL, ext.mask, float(np.count_nonzero(ext.mask) * volume.voxel_volume_cc),
                          holes_filled_cc=ext.holes_filled_cc, excluded_cc=ext.excluded_cc)
    res.box = bounding_box(ext.mask)
    if res.box is not None:
        sub = ext.mask[res.box]
        # centre from every 2nd voxel in-plane (plenty for a body's centre)
        res.centroid_index = np.array(ndimage.center_of_mass(sub[:, ::2, ::2])) * [1, 2, 2] + [
            b.start for b in res.box
        ]
    res.flags.extend(check_external(volume, ext.mask))
    return res


def midline_x(volume: Volume, external: StructureResult | None) -> float:
    """x (LPS, mm) of the patient's midline: the External's centre of mass, else the body's.

    The body's centre comes from every 4th voxel in each axis above ``BODY_HU`` (plenty
    for a centre of mass); 0.0 when the image holds no body at all.
    """
    if external is not None and external.volume_cc and external.centroid_index is not None:
        return float(volume.index_to_lps(external.centroid_index[None])[0, 0])
    step = 4
    body = volume.array[::step, ::step, ::step] > BODY_HU
    if not body.any():
        return 0.0
    return float(volume.index_to_lps(np.array(ndimage.center_of_mass(body))[None] * step)[0, 0])


def _check_external(volume: Volume, external: bool | StructureResult) -> StructureResult | None:
    """``postprocess``'s ``external`` argument as a result (computed if ``True``), or None."""
    if external is False:
        return None
    ext = external_structure(volume) if external is True else external
    if ext.name != EXTERNAL or np.shape(ext.mask) != volume.array.shape:
        raise ValueError(f"external must be the External on the volume's grid, got {ext.name} {np.shape(ext.mask)}")
    return ext


def _set_flags(res: StructureResult, defn: StructureDefinition, volume: Volume, midline: float) -> None:
    """The result's checks, from scratch: empty, laterality, plausible volume (flags only)."""
    res.flags = []
    if res.volume_cc == 0:
        res.flags.append("empty: structure not found")
        return
    c = volume.index_to_lps(res.centroid_index[None])[0]
    res.centroid_lps = tuple(round(float(v), 2) for v in c)
    flag = laterality_flag(defn, c, midline)
    if flag:
        res.flags.append(flag)
    lo, hi = defn.volume_range_cc
    if not lo <= res.volume_cc <= hi:
        res.flags.append(f"volume {res.volume_cc:.1f} cc outside the plausible range {lo}-{hi} cc")


def postprocess_masks(
    volume: Volume, masks: dict[str, np.ndarray], external: StructureResult | None
) -> dict[str, StructureResult]:
    """One model's structures, without the External: targets clipped to ``external`` (when
    it is not empty), the component and hole rules, nested levels among ``masks``, flags.

    The app runs this in each model's branch as soon as that model is done, so only the
    last model's structures are left on the critical path; ``merge_structures`` then
    joins the branches.  Returns ``{name: StructureResult}`` in the structure table's order.
    """
    voxel_cc = volume.voxel_volume_cc
    body_mask = external.mask if external is not None and external.volume_cc else None
    midline = midline_x(volume, external)
    results: dict[str, StructureResult] = {}
    for name in _table_order(masks):
        mask, defn = masks[name], structure(name)
        clipped = 0
        if body_mask is not None and defn.is_target:
            mask, clipped = clip_to_external(mask, body_mask)
            if clipped:
                logger.info("%s: %d voxels (%.2f cc) outside the External clipped", name, clipped, clipped * voxel_cc)
        res = postprocess_structure(mask, defn, voxel_cc, volume.spacing)
        res.clipped_cc = clipped * voxel_cc
        for inner in defn.contains:
            if inner in results:
                _add_contained(res, results[inner], voxel_cc)
        _set_flags(res, defn, volume, midline)
        results[name] = res
    return results


def merge_structures(
    volume: Volume, external: StructureResult | None, parts: Sequence[dict[str, StructureResult]]
) -> dict[str, StructureResult]:
    """The External, then every model's structures (``postprocess_masks`` results) in the
    structure table's order; nested levels that span two models are completed here (and
    their flags checked again).  Every flag is logged once, here.
    """
    merged: dict[str, StructureResult] = {}
    for part in parts:
        for name, res in part.items():
            if name in merged:
                raise ValueError(f"{name} comes from two models; each structure must come from one")
            merged[name] = res
    results: dict[str, StructureResult] = {}
    if external is not None:
        if external.centroid_index is not None:
            external.centroid_lps = tuple(
                round(float(v), 2) for v in volume.index_to_lps(external.centroid_index[None])[0]
            )
        results[EXTERNAL] = external
    midline = None
    for name in _table_order(merged):
        res, defn = merged[name], structure(name)
        added = [_add_contained(res, results[inner], volume.voxel_volume_cc) for inner in defn.contains if inner in results]
        if any(added):
            midline = midline_x(volume, external) if midline is None else midline
            _set_flags(res, defn, volume, midline)
        results[name] = res
    for name, res in results.items():
        for f in res.flags:
            logger.warning("%s: %s", name, f)
    return results


def postprocess(
    volume: Volume, masks: dict[str, np.ndarray], *, external: bool | StructureResult = True
) -> dict[str, StructureResult]:
    """The External, then every structure; flags attached (``postprocess_masks`` and
    ``merge_structures`` in one call).

    ``external``: ``True`` computes the External here (``external_structure``), a
    ``StructureResult`` is one already computed on ``volume``, ``False`` leaves it out.

    Returns ``{name: StructureResult}``: ``External`` first, then the structure table's order.
    Targets are clipped to the External (unless it is empty: then nothing is clipped and
    the External is flagged).
    """
    ext = _check_external(volume, external)
    return merge_structures(volume, ext, [postprocess_masks(volume, masks, ext)])


def _table_order(names) -> list[str]:
    """``names`` in the structure table's order (a structure after those it contains)."""
    rank = {s.name: i for i, s in enumerate(STRUCTURES)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))
