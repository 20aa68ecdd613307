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
import numpy as np
from scipy import ndimage

from autocontour.backends import Backend
from autocontour.model_config import ModelConfig
from autocontour.volume import Volume, to_canonical

logger = logging.getLogger(__name__)

__all__ = ["segment", "resample_linear", "sliding_window", "body_box", "to_model_grid"]

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


def to_model_grid(canon: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Canonical HU array -> model grid (model voxel m sits at source index m * step).

    One axis at a time, the most-shrinking first, so each Gaussian anti-aliasing filter
    (sigma = (step - 1) / 2, as skimage's rescale) runs on an already reduced array.
    """
    out = np.asarray(canon, np.float32)
    for a in sorted(range(3), key=lambda a: -step[a]):
        st = float(step[a])
        if st > 1.2:
            out = ndimage.gaussian_filter1d(out, sigma=(st - 1) / 2, axis=a, mode="nearest", truncate=3.0)
        n = int(np.floor((canon.shape[a] - 1) / st)) + 1
        if n != out.shape[a] or st != 1.0:
            out = _interp_axis(out, a, np.arange(n) * st)
    return out


def _model_grid_image(volume: Volume, canon: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``to_model_grid`` once per volume and spacing: models sharing a spacing share the work."""
    key = ("model_grid", tuple(np.round(step, 6)))
    cache = volume.cache
    if key not in cache:
        cache[key] = to_model_grid(canon, step)
    return cache[key]


def segment(volume: Volume, model: ModelConfig, backend: Backend) -> dict[str, np.ndarray]:
    """Masks (bool, the volume's (k, j, i) order) for each label of ``model``."""
    view = to_canonical(volume)
    canon = view.forward(volume.array)
    step = np.array(model.spacing_zyx) / np.array(view.spacing_zyx)  # source voxels per model voxel
    small = _model_grid_image(volume, canon, step)
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
    sl = tuple(slice(a, b) for a, b in zip(plo, phi))
    if model.kind == "softmax":
        # running maximum over channels: cheaper than argmax over the (strided) channel axis
        best, lab = region[0], np.zeros(region.shape[1:], np.uint8)
        for c in range(1, region.shape[0]):
            better = region[c] > best
            lab[better] = c
            best = np.maximum(best, region[c])
        fg_of = [lab == c + 1 for c in range(len(model.labels))]
    else:
        fg_of = [region[c] > 0.5 for c in range(len(model.labels))]
    for c, name in enumerate(model.labels):
        # view.forward(mask) is a view: writing the canonical region fills the (k, j, i) mask
        view.forward(masks[name])[sl] = fg_of[c]
    return masks
