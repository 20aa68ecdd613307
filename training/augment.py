"""Training patches with nnU-Net-style augmentation, in numpy/SciPy only (no torch).

One patch is cut straight out of the whole (normalised) patient array through one
affine map, so rotation and scaling cost one ``map_coordinates`` call on the patch's
voxels, not a transform of the whole volume:

* spatial: rotation in the axial plane (the CT's own slices, so every output slice
  still lies at one source z and per-slice "known" flags stay exact) and isotropic
  scaling, each with probability ``p_rotation`` / ``p_scale`` (nnU-Net: 0.2 each), and,
  when ``p_elastic`` is set, elastic deformation in the same plane;
* left-right mirroring (probability 0.5) with the laterality pairs swapped
  (``Parotid_L`` <-> ``Parotid_R``): a mirrored left parotid is a right parotid;
* intensity, on the normalised image: Gaussian noise, Gaussian blur, multiplicative
  brightness, contrast, simulated low resolution and gamma (also inverted), with
  nnU-Net's probabilities and ranges.

Targets are a softmax label map (0 = background) or a sigmoid stack (n_out, z, y, x),
and ``known_z`` (n_out, z) says on which slices each output's reference is valid: a
structure a patient lacks is unknown everywhere, and a tubular organ contoured over a
clinician-chosen length is unknown beyond its reference's first and last slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["AugmentConfig", "Patch", "cut_patch", "augment_intensity", "mirror_lr", "known_slices"]


@dataclass(frozen=True)
class AugmentConfig:
    p_rotation: float = 0.2
    max_rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_mirror: float = 0.5
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.05)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma: float = 0.3
    p_gamma_inverted: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.5)
    # elastic deformation in the axial plane (``--elastic P``); off by default, as in nnU-Net
    # v2 (v1 used p 0.2 with these ranges, in output voxels)
    p_elastic: float = 0.0
    elastic_alpha: tuple[float, float] = (0.0, 900.0)
    elastic_sigma: tuple[float, float] = (9.0, 13.0)


NO_AUGMENTATION = AugmentConfig(
    p_rotation=0, p_scale=0, p_mirror=0, p_noise=0, p_blur=0, p_brightness=0, p_contrast=0, p_lowres=0, p_gamma=0,
    p_gamma_inverted=0,
)


@dataclass
class Patch:
    image: np.ndarray  # float32 (pz, py, px)
    target: np.ndarray  # int64 (pz, py, px) labels, or float32 (n_out, pz, py, px)
    known_z: np.ndarray  # bool (n_out, pz)
    context: np.ndarray | None = None  # uint8 (pz, py, px) label map of another model, if any


def known_slices(masks_present: np.ndarray, masks: list[np.ndarray | None], partial_length: tuple[bool, ...]) -> np.ndarray:
    """(n_out, z) bool: slices on which each output's reference says something.

    ``masks[i]`` is output i's reference (z, y, x) or None when the patient lacks it.  For an
    output with ``partial_length[i]`` only the slices from its first to its last contoured
    slice are known; a partial-length output with an empty reference is unknown throughout.
    """
    nz = next(m.shape[0] for m in masks if m is not None) if any(m is not None for m in masks) else 0
    out = np.zeros((len(masks), nz), bool)
    for i, m in enumerate(masks):
        if m is None or not masks_present[i]:
            continue
        if partial_length[i]:
            zs = np.flatnonzero(m.any((1, 2)))
            if len(zs):
                out[i, zs[0] : zs[-1] + 1] = True
        else:
            out[i] = True
    return out


def _crop(arr: np.ndarray, start: np.ndarray, size: np.ndarray, pad_value) -> np.ndarray:
    """``arr[..., start:start+size]`` over the last three axes, padded where it leaves the array."""
    sp = np.array(arr.shape[-3:])
    lo, hi = np.maximum(start, 0), np.minimum(start + size, sp)
    out = np.full(arr.shape[:-3] + tuple(size), pad_value, dtype=arr.dtype)
    if np.all(hi > lo):
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        src = tuple(slice(a, b) for a, b in zip(lo, hi))
        out[(..., *dst)] = arr[(..., *src)]
    return out


def cut_patch(
    image: np.ndarray, target: np.ndarray, known_z: np.ndarray, centre: np.ndarray, patch: tuple[int, int, int],
    rng: np.random.Generator, cfg: AugmentConfig, context: np.ndarray | None = None,
) -> Patch:
    """A patch centred on ``centre`` (z, y, x voxel), rotated/scaled with the config's odds.

    Output voxel g samples source position ``centre + A (g - (patch - 1) / 2)``, with
    ``A = s * R`` (R a rotation in the (y, x) plane).  Without rotation or scaling the patch
    is an exact crop.  The image is interpolated linearly (pad 0), labels by nearest neighbour;
    ``context`` (another model's label map, training/context.py) is cut as a label map.
    """
    p = np.array(patch)
    rotate = rng.random() < cfg.p_rotation
    scale = rng.random() < cfg.p_scale
    elastic = cfg.p_elastic > 0 and rng.random() < cfg.p_elastic  # no draw when off: older stages' streams
    if not rotate and not scale and not elastic:
        start = np.asarray(centre) - p // 2
        kz = np.zeros((known_z.shape[0], p[0]), bool)
        z0, z1 = max(start[0], 0), min(start[0] + p[0], known_z.shape[1])
        if z1 > z0:
            kz[:, z0 - start[0] : z1 - start[0]] = known_z[:, z0:z1]
        ctx = None if context is None else _crop(context, start, p, context.dtype.type(0))
        return Patch(_crop(image, start, p, np.float32(0)), _crop(target, start, p, target.dtype.type(0)), kz, ctx)
    theta = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg)) if rotate else 0.0
    s = rng.uniform(*cfg.scale) if scale else 1.0
    c, si = np.cos(theta), np.sin(theta)
    d = [np.arange(n) - (n - 1) / 2 for n in p]
    zsrc = centre[0] + s * d[0]
    gy, gx = np.meshgrid(d[1], d[2], indexing="ij")
    ysrc = centre[1] + s * (c * gy - si * gx)
    xsrc = centre[2] + s * (si * gy + c * gx)
    coords = np.empty((3, *p), np.float32)
    coords[0] = zsrc[:, None, None]
    coords[1] = ysrc[None]
    coords[2] = xsrc[None]
    if elastic:  # a smooth random in-plane displacement (nnU-Net v1's): each output slice stays at one source z
        alpha, sigma = rng.uniform(*cfg.elastic_alpha), rng.uniform(*cfg.elastic_sigma)
        for ax in (1, 2):
            noise = rng.uniform(-1.0, 1.0, tuple(p)).astype(np.float32)
            coords[ax] += s * alpha * ndimage.gaussian_filter(noise, sigma, mode="constant", cval=0.0)
    img = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0, prefilter=False)
    if target.ndim == 3:
        tgt = ndimage.map_coordinates(target, coords, order=0, mode="constant", cval=0)
    else:
        tgt = np.stack([ndimage.map_coordinates(t, coords, order=0, mode="constant", cval=0.0) for t in target])
    zi = np.rint(zsrc).astype(int)
    inside = (zi >= 0) & (zi < known_z.shape[1])
    kz = np.zeros((known_z.shape[0], p[0]), bool)
    kz[:, inside] = known_z[:, zi[inside]]
    ctx = None if context is None else ndimage.map_coordinates(context, coords, order=0, mode="constant", cval=0)
    return Patch(img.astype(np.float32), tgt, kz, ctx)


def _swap_labels(lab: np.ndarray, swap: tuple[tuple[int, int], ...]) -> None:
    """Exchange labels a + 1 and b + 1 of a label map in place, for each pair (a, b)."""
    for a, b in swap:
        la, lb = lab == a + 1, lab == b + 1
        lab[la], lab[lb] = b + 1, a + 1


def mirror_lr(
    patch: Patch, swap: tuple[tuple[int, int], ...], softmax: bool, context_swap: tuple[tuple[int, int], ...] = ()
) -> Patch:
    """Flip patient left-right (the x axis) and swap each laterality pair of outputs.

    ``swap`` holds output indices (0-based, background not counted); for a softmax label
    map the labels are index + 1.  The context label map, if any, is flipped and its own
    pairs (``context_swap``, same convention) swapped: the organ model's left parotid of a
    mirrored patient is its right one.
    """
    img = patch.image[..., ::-1].copy()
    tgt = patch.target[..., ::-1].copy()
    kz = patch.known_z.copy()
    if softmax:
        _swap_labels(tgt, swap)
    for a, b in swap:
        if not softmax:
            tgt[[a, b]] = tgt[[b, a]]
        kz[[a, b]] = kz[[b, a]]
    ctx = None
    if patch.context is not None:
        ctx = patch.context[..., ::-1].copy()
        _swap_labels(ctx, context_swap)
    return Patch(img, tgt, kz, ctx)


def augment_intensity(x: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """nnU-Net's intensity transforms on a normalised (0..1 window) float32 patch."""
    x = x.astype(np.float32, copy=True)
    if rng.random() < cfg.p_noise:
        x += rng.normal(0.0, rng.uniform(*cfg.noise_std), x.shape).astype(np.float32)
    if rng.random() < cfg.p_blur:
        x = ndimage.gaussian_filter(x, rng.uniform(*cfg.blur_sigma))
    if rng.random() < cfg.p_brightness:
        x *= rng.uniform(*cfg.brightness)
    if rng.random() < cfg.p_contrast:
        m, lo, hi = x.mean(), x.min(), x.max()
        x = np.clip((x - m) * rng.uniform(*cfg.contrast) + m, lo, hi)
    if rng.random() < cfg.p_lowres:
        z = rng.uniform(*cfg.lowres_zoom)
        small = ndimage.zoom(x, z, order=0)
        x = ndimage.zoom(small, np.array(x.shape) / np.array(small.shape), order=1)[
            : x.shape[0], : x.shape[1], : x.shape[2]
        ]
    for inverted, p in ((True, cfg.p_gamma_inverted), (False, cfg.p_gamma)):
        if rng.random() < p:
            g = rng.uniform(*cfg.gamma)
            lo, hi = x.min(), x.max()
            r = (x - lo) / max(hi - lo, 1e-6)
            r = 1 - (1 - r) ** g if inverted else r**g
            x = r * (hi - lo) + lo
    return x.astype(np.float32)
