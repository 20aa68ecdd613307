"""Run one segmentation model on a Volume: canonical frame -> model grid -> back.

1. The volume is viewed in the canonical (z, y, x) frame (exact transposes/flips).
2. It is resampled to the model's spacing (separable linear interpolation, Gaussian
   anti-aliasing when shrinking), cropped to the body's bounding box, windowed.
3. Sliding-window inference with Gaussian blending over the crop.
4. Only the region where a structure is likely is interpolated back to the patient
   grid (all channels, then argmax for exclusive labels / > 0.5 for independent ones),
   so the full-resolution probability volume is never built.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from autocontour.backends import Backend
from autocontour.model_config import ModelConfig
from autocontour.volume import Volume, to_canonical

logger = logging.getLogger(__name__)

__all__ = ["segment", "resample_linear", "sliding_window", "body_box", "ModelGrid"]

BODY_HU = -400.0  # air/body threshold for the crop
BODY_MARGIN_MM = 16.0
REGION_PROBABILITY = 0.2  # model-grid voxels above this are mapped back to the patient grid


def _interp_axis(arr: np.ndarray, axis: int, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at fractional indices ``pos``."""
    n = arr.shape[axis]
    pos = np.clip(pos, 0, n - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo).astype(np.float32)
    shape = [1] * arr.ndim
    shape[axis] = len(pos)
    w = w.reshape(shape)
    a = np.take(arr, lo, axis=axis)
    b = np.take(arr, hi, axis=axis)
    a *= 1 - w
    b *= w
    a += b
    return a


def resample_linear(arr: np.ndarray, positions: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Separable trilinear resampling of a 3-D (or channel-first 4-D) array.

    ``positions[a]`` are the fractional source indices of the output samples along
    spatial axis ``a``.  Axes that shrink most are done first to keep copies small.
    """
    off = arr.ndim - 3
    out = arr
    order = sorted(range(3), key=lambda a: len(positions[a]) / arr.shape[off + a])
    for a in order:
        out = _interp_axis(out, off + a, positions[a])
    return out


@dataclass(frozen=True)
class ModelGrid:
    """The model-grid crop: canonical fractional index = (m + start) * step."""

    start: tuple[int, int, int]
    shape: tuple[int, int, int]
    step: tuple[float, float, float]  # model spacing / patient spacing, per canonical axis


def body_box(image: np.ndarray, spacing_zyx: tuple[float, ...]) -> tuple[slice, slice, slice]:
    """Bounding box of the patient on a model-grid HU image (table and air excluded)."""
    body = image > BODY_HU
    if not body.any():
        return tuple(slice(0, s) for s in image.shape)
    # 2-D projection; erosion cuts the thin couch off the body before picking the largest part
    proj = body.any(0)
    er = ndimage.binary_erosion(proj, iterations=2)
    lab, n = ndimage.label(er if er.any() else proj)
    if n > 1:
        sizes = ndimage.sum_labels(np.ones_like(lab), lab, range(1, n + 1))
        proj = lab == (1 + int(np.argmax(sizes)))
    else:
        proj = lab > 0
    ys, xs = np.nonzero(proj)
    zs = np.nonzero(body[:, ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].any((1, 2)))[0]
    m = [int(np.ceil(BODY_MARGIN_MM / s)) for s in spacing_zyx]
    lo = (zs.min() - m[0], ys.min() - m[1], xs.min() - m[2])
    hi = (zs.max() + m[0] + 1, ys.max() + m[1] + 1, xs.max() + m[2] + 1)
    return tuple(slice(max(0, a), min(s, b)) for a, b, s in zip(lo, hi, image.shape))


def _gaussian_weight(patch: tuple[int, int, int]) -> np.ndarray:
    axes = [np.exp(-0.5 * ((np.arange(p) - (p - 1) / 2) / (p / 8)) ** 2) for p in patch]
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = w / w.max()
    return np.maximum(w, 1e-3).astype(np.float32)


def sliding_window(
    image: np.ndarray, patch: tuple[int, int, int], predict, n_out: int, overlap: float = 0.25, batch: int = 2
) -> np.ndarray:
    """Blend ``predict`` over overlapping windows of ``image`` (Z, Y, X) -> (C, Z, Y, X) logits."""
    pad = [max(0, p - s) for p, s in zip(patch, image.shape)]
    padded = np.pad(image, [(q // 2, q - q // 2) for q in pad], mode="constant", constant_values=0.0)
    shape = padded.shape
    starts = []
    for s, p in zip(shape, patch):
        n = int(np.ceil((s - p) / (p * (1 - overlap)))) + 1 if s > p else 1
        starts.append(sorted({int(round(v)) for v in np.linspace(0, s - p, n)}))
    w = _gaussian_weight(patch)
    acc = np.zeros((n_out, *shape), np.float32)
    norm = np.zeros(shape, np.float32)
    windows = list(itertools.product(*starts))
    for b in range(0, len(windows), batch):
        group = windows[b : b + batch]
        x = np.stack([padded[z : z + patch[0], y : y + patch[1], x_ : x_ + patch[2]] for z, y, x_ in group])[:, None]
        out = predict(x)
        for (z, y, x_), o in zip(group, out):
            acc[:, z : z + patch[0], y : y + patch[1], x_ : x_ + patch[2]] += o * w
            norm[z : z + patch[0], y : y + patch[1], x_ : x_ + patch[2]] += w
    acc /= norm
    crop = tuple(slice(q // 2, q // 2 + s) for q, s in zip(pad, image.shape))
    return acc[(slice(None), *crop)]


def _to_probabilities(logits: np.ndarray, kind: str) -> np.ndarray:
    if kind == "softmax":
        e = np.exp(logits - logits.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def segment(volume: Volume, model: ModelConfig, backend: Backend) -> dict[str, np.ndarray]:
    """Masks (bool, the volume's (k, j, i) order) for each label of ``model``."""
    view = to_canonical(volume)
    canon = view.forward(volume.array)
    src = np.array(view.spacing_zyx)
    step = np.array(model.spacing_zyx) / src  # source voxels per model voxel
    full_shape = tuple(int(np.floor((n - 1) / st)) + 1 for n, st in zip(canon.shape, step))
    # symmetric Gaussian anti-aliasing on axes that shrink (sigma as skimage's rescale)
    img = canon
    for a, st in enumerate(step):
        if st > 1.2:
            img = ndimage.gaussian_filter1d(img, sigma=(st - 1) / 2, axis=a, mode="nearest", truncate=3.0)
    small = resample_linear(np.asarray(img, np.float32), tuple(np.arange(n) * st for n, st in zip(full_shape, step)))
    box = body_box(small, model.spacing_zyx)
    crop = small[box]
    lo, hi = model.window_hu
    x = (np.clip(crop, lo, hi) - lo) / (hi - lo)
    n_out = len(model.labels) + (1 if model.kind == "softmax" else 0)
    logits = sliding_window(x.astype(np.float32), model.patch_zyx, backend.predict, n_out)
    probs = _to_probabilities(logits, model.kind)
    fg = probs[1:] if model.kind == "softmax" else probs
    masks = {name: np.zeros(volume.array.shape, bool) for name in model.labels}
    likely = fg.max(0) > REGION_PROBABILITY
    if not likely.any():
        logger.info("model %s: no structure found", model.name)
        return masks
    idx = np.argwhere(likely)
    mlo = idx.min(0) - 1 + np.array([b.start for b in box])
    mhi = idx.max(0) + 2 + np.array([b.start for b in box])
    # patient-grid (canonical) voxels inside the likely region
    plo = np.maximum(np.ceil(mlo * step).astype(int), 0)
    phi = np.minimum(np.floor(mhi * step).astype(int) + 1, canon.shape)
    positions = tuple(np.arange(a, b) / st - bx.start for a, b, st, bx in zip(plo, phi, step, box))
    region = resample_linear(probs, positions)
    canon_masks = np.zeros((len(model.labels), *canon.shape), bool)
    sl = tuple(slice(a, b) for a, b in zip(plo, phi))
    if model.kind == "softmax":
        lab = region.argmax(0)
        for c in range(len(model.labels)):
            canon_masks[(c, *sl)] = lab == c + 1
    else:
        canon_masks[(slice(None), *sl)] = region > 0.5
    for c, name in enumerate(model.labels):
        masks[name] = np.ascontiguousarray(view.inverse(canon_masks[c]))
    return masks
