"""The steps of running one segmentation model on a Volume, as pure functions.

``autocontour.segmenter.Segmenter.predict`` runs them in this order:

1. The volume is viewed in the canonical (z, y, x) frame (exact transposes/flips).
2. It is resampled to the model's spacing (separable linear interpolation, Gaussian
   anti-aliasing when shrinking), cropped to the body's bounding box, windowed.
3. Sliding-window inference with Gaussian blending over the crop (with test-time
   mirroring, ``mirrored``, when the segmenter asks for it).
4. Each structure is decided on the patient grid only inside the box where it can come
   out positive, from interpolated probabilities of just the channels that can compete
   there (``masks_on_patient_grid``), so the full-resolution probability volume is never
   built.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
from scipy import ndimage

from autocontour.backends import WINDOW_BATCH
from autocontour.model_config import ModelConfig, ModelKind
from autocontour.structures import mirror_partner
from autocontour.volume import BODY_HU

logger = logging.getLogger(__name__)

__all__ = [
    "resample_linear", "window_starts", "sliding_window", "body_box", "to_model_grid", "to_probabilities",
    "masks_on_patient_grid", "mirror_permutation", "mirrored", "averaged",
]

BODY_MARGIN_MM = 16.0


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


def window_starts(shape: tuple[int, ...], patch: tuple[int, int, int], overlap: float = 0.25) -> list[list[int]]:
    """Per axis, the start indices of ``sliding_window``'s windows over an image of ``shape``
    (an axis shorter than the patch is padded to it: one window)."""
    starts = []
    for s, p in zip(shape, patch):
        n = int(np.ceil((s - p) / (p * (1 - overlap)))) + 1 if s > p else 1
        starts.append(sorted({int(round(v)) for v in np.linspace(0, max(s - p, 0), n)}))
    return starts


def sliding_window(
    image: np.ndarray, patch: tuple[int, int, int], predict, n_out: int, overlap: float = 0.25,
    batch: int = WINDOW_BATCH,
) -> np.ndarray:
    """Blend ``predict`` over overlapping windows of ``image`` (Z, Y, X) -> (C, Z, Y, X) logits."""
    pad = [max(0, p - s) for p, s in zip(patch, image.shape)]
    padded = np.pad(image, [(q // 2, q - q // 2) for q in pad], mode="constant", constant_values=0.0)
    shape = padded.shape
    starts = window_starts(shape, patch, overlap)
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


def to_probabilities(logits: np.ndarray, kind: ModelKind) -> np.ndarray:
    """(C, ...) logits -> probabilities: softmax over the channels, or each channel's sigmoid."""
    if ModelKind(kind) is ModelKind.SOFTMAX:
        e = np.exp(logits - logits.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)
    return 1.0 / (1.0 + np.exp(-logits))


def to_model_grid(canon: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Canonical HU array -> model grid (model voxel m sits at source index m * step).

    Separable: along each axis, Gaussian anti-aliasing when shrinking by more than 1.2
    (``scipy.ndimage.gaussian_filter1d``, sigma = (step - 1) / 2 as skimage's rescale, mode
    nearest, truncate 3), then linear sampling.  The most-shrinking axis goes first (the
    last array axis among equals), so later axes run on reduced arrays.  Single-threaded
    on purpose: the same filter written as one BLAS product per axis was 0.3 s slower in
    the app on two cores, where the other graph branch holds the second core
    (docs/benchmark.md).
    """
    out = np.asarray(canon, np.float32)
    for a in sorted(range(3), key=lambda a: (-step[a], -a)):
        st = float(step[a])
        n = int(np.floor((canon.shape[a] - 1) / st)) + 1
        if st == 1.0 and n == out.shape[a]:
            continue
        if st > 1.2:
            out = ndimage.gaussian_filter1d(out, (st - 1) / 2, axis=a, mode="nearest", truncate=3.0)
        out = _interp_axis(out, a, np.arange(n) * st)
    return np.ascontiguousarray(out)


def mirror_permutation(model: ModelConfig) -> list[int]:
    """Output channel order of the left-right mirrored image: each lateral structure's
    channel swapped with its partner's (``Parotid_L`` <-> ``Parotid_R``, from the structure
    table), every other channel (background too) in place."""
    first = model.kind.background_channels
    perm = list(range(model.output_count))
    for i, name in enumerate(model.labels):
        partner = mirror_partner(name)
        if partner is not None and partner in model.labels:
            perm[i + first] = model.labels.index(partner) + first
    return perm


def mirrored(predict, perm: list[int]):
    """Test-time mirroring: ``predict`` averaged (logits) with its prediction on the patient
    mirrored left-right (the canonical x axis), channels swapped back by ``perm``."""

    def both(x: np.ndarray) -> np.ndarray:
        a = predict(x)
        b = predict(np.ascontiguousarray(x[..., ::-1]))[:, perm, ..., ::-1]
        a += b
        a *= 0.5
        return a

    return both


def averaged(predicts: list):
    """An ensemble: the mean of the logits of several networks with the same outputs."""

    def mean(x: np.ndarray) -> np.ndarray:
        out = predicts[0](x)
        for p in predicts[1:]:
            out += p(x)
        out /= len(predicts)
        return out

    return mean


def masks_on_patient_grid(
    probs: np.ndarray, kind: ModelKind, box: tuple[slice, ...], step: np.ndarray, canon_shape: tuple[int, ...]
):
    """Per structure, its mask on the canonical patient grid, in the region where it can win.

    ``probs`` (C, z, y, x) are the model's probabilities on the model-grid crop ``box``;
    model voxel m of the crop sits at canonical patient index (m + box.start) * step.  The
    patient-grid decision is made on trilinearly interpolated probabilities (argmax over
    all channels for ``softmax``, > 0.5 for ``sigmoid``), but only where it can come out
    positive, so the full-resolution probability volume is never built:

    * sigmoid: an interpolated value is > 0.5 only between model voxels of which one is;
    * softmax: the argmax of C probabilities is >= 1/C, so structure c can win only
      between model voxels where p_c >= 1/C, and only channels reaching 1/C somewhere in
      that box can beat it there.  The result equals the argmax of all C interpolated
      channels over the whole grid (up to exact ties).

    Yields ``(label index, canonical slice, bool mask)``, possibly several (overlapping)
    boxes per structure; a structure that wins nowhere yields nothing.  The model never saw
    outside the crop, so nothing is placed beyond it.
    """
    kind = ModelKind(kind)
    softmax = kind is ModelKind.SOFTMAX
    first = kind.background_channels
    threshold = 1.0 / probs.shape[0] if softmax else 0.5
    offset = np.array([b.start for b in box])
    for c in range(first, probs.shape[0]):
        cand = probs[c] >= threshold if softmax else probs[c] > 0.5
        if not cand.any():
            continue
        # one box per group of candidate voxels: each 26-connected component's box, grown by
        # the one model voxel that interpolation reaches, merged with the boxes it meets, so
        # scattered specks far from the structure do not stretch one box over the whole scan
        lab, _ = ndimage.label(cand, structure=np.ones((3, 3, 3), bool))
        limit = np.array(cand.shape) - 1
        boxes = [
            (np.maximum([o.start - 1 for o in obj], 0), np.minimum([o.stop for o in obj], limit))
            for obj in ndimage.find_objects(lab)
        ]
        for mlo, mhi in _merge_boxes(boxes):  # inclusive, model-grid crop indices
            found = _decide_in_box(probs, kind, c, threshold, mlo, mhi, offset, step, canon_shape)
            if found is not None:
                yield (c - first, *found)


Box = tuple[np.ndarray, np.ndarray]  # inclusive (low, high) corner indices


def _merge_boxes(boxes: list[Box], max_boxes: int = 64) -> list[Box]:
    """Inclusive boxes merged until none meets (overlaps or touches) another; more than
    ``max_boxes`` become one box around all (only ever larger, never less exact)."""
    if len(boxes) > max_boxes:
        return [(np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0))]
    merged = True
    while merged:
        merged = False
        out: list[Box] = []
        for lo, hi in boxes:
            for n, (olo, ohi) in enumerate(out):
                if np.all(lo <= ohi + 1) and np.all(olo <= hi + 1):
                    out[n] = (np.minimum(lo, olo), np.maximum(hi, ohi))
                    merged = True
                    break
            else:
                out.append((lo, hi))
        boxes = out
    return boxes


def _decide_in_box(probs, kind, c, threshold, mlo, mhi, offset, step, canon_shape):
    """Structure c's exact decision on the patient voxels whose model coordinate lies in
    the model-grid box [mlo, mhi] (inclusive); None if it wins nowhere there."""
    # canonical patient voxels whose model coordinate p / step - offset lies in [mlo, mhi]
    plo = np.maximum(np.ceil((mlo + offset) * step - 1e-6).astype(int), 0)
    phi = np.minimum(np.floor((mhi + offset) * step + 1e-6).astype(int) + 1, canon_shape)
    if np.any(phi <= plo):
        return None
    positions = tuple(np.arange(a, b) / st - o - m for a, b, st, o, m in zip(plo, phi, step, offset, mlo))
    sub = probs[(slice(None), *(slice(a, b + 1) for a, b in zip(mlo, mhi)))]
    if kind is ModelKind.SOFTMAX:
        # only channels that reach 1/C somewhere here can beat structure c
        chans = [k for k in range(sub.shape[0]) if k == c or (sub[k] >= threshold).any()]
        region = resample_linear(np.ascontiguousarray(sub[chans]), positions)
        mine = chans.index(c)
        best = region[mine]
        mask = np.ones(best.shape, bool)
        for j in range(len(chans)):
            if j != mine:
                # >= for channels before c, > after: argmax's first-index rule for ties
                mask &= (region[j] < best) if j < mine else (region[j] <= best)
    else:
        mask = resample_linear(np.ascontiguousarray(sub[c : c + 1]), positions)[0] > 0.5
    if not mask.any():
        return None
    return tuple(slice(a, b) for a, b in zip(plo, phi)), mask
