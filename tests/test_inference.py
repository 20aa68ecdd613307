"""Model-grid resampling, sliding window and the round trip back to the patient grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fakes import FakeBackend
from scipy import ndimage

from autocontour.inference import (
    _merge_boxes, body_box, masks_on_patient_grid, resample_linear, sliding_window, to_model_grid, window_starts,
)
from autocontour.model_config import ModelConfig
from autocontour.segmenter import Segmenter
from autocontour.volume import Volume

ORIENTATIONS = {
    # name: (row cosine = +i direction, column cosine = +j direction)
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}


def model(kind="sigmoid", labels=("PTV_High",)) -> ModelConfig:
    return ModelConfig(
        name="fake", version="0", folder=Path("."), onnx_file="none.onnx", onnx_sha256="0" * 64, kind=kind,
        labels=labels, spacing_zyx=(3.0, 4.0, 4.0), window_hu=(-500.0, 1000.0), patch_zyx=(16, 16, 16),
    )


def test_resample_linear_matches_analytic_ramp():
    z, y, x = np.indices((10, 12, 14)).astype(np.float32)
    ramp = 2 * z + 3 * y - x
    pos = (np.array([0.5, 3.25]), np.array([1.0, 10.5]), np.array([0.0, 13.0]))
    out = resample_linear(ramp, pos)
    zz, yy, xx = np.meshgrid(*pos, indexing="ij")
    np.testing.assert_allclose(out, 2 * zz + 3 * yy - xx, atol=1e-4)


def test_sliding_window_covers_every_voxel_once_blended():
    img = np.random.default_rng(0).random((20, 37, 41)).astype(np.float32)
    out = sliding_window(img, (16, 16, 16), lambda x: np.concatenate([x, 2 * x], 1), n_out=2)
    np.testing.assert_allclose(out[0], img, rtol=1e-5)
    np.testing.assert_allclose(out[1], 2 * img, rtol=1e-5)


def test_sliding_window_pads_small_volumes():
    img = np.ones((5, 9, 40), np.float32)
    out = sliding_window(img, (16, 16, 16), lambda x: x, n_out=1)
    assert out.shape == (1, 5, 9, 40)
    np.testing.assert_allclose(out, 1.0)


def test_window_starts_are_the_windows_sliding_window_runs():
    """hn-chus-052's hn_oar crop: 6 windows of 64 x 80 x 80, 2 of 80 x 80 x 144 (as the benchmark counted)."""
    crop = (132, 76, 130)
    assert window_starts(crop, (64, 80, 80)) == [[0, 34, 68], [0], [0, 50]]
    assert window_starts(crop, (80, 80, 144)) == [[0, 52], [0], [0]]
    seen = []
    img = np.zeros((20, 37, 41), np.float32)
    sliding_window(img, (16, 16, 16), lambda x: seen.append(len(x)) or x, n_out=1, batch=1)
    assert len(seen) == np.prod([len(a) for a in window_starts(img.shape, (16, 16, 16))])


def test_body_box_excludes_the_couch():
    img = np.full((10, 60, 60), -1000.0, np.float32)
    img[2:8, 10:30, 15:45] = 0  # patient
    img[:, 50:52, 5:55] = 100  # thin couch below, not touching
    box = body_box(img, (3.0, 4.0, 4.0))
    assert box[1].stop <= 30 + 5 and box[1].start >= 10 - 5  # margin 16 mm = 4 voxels
    assert box[2].start >= 15 - 5 and box[2].stop <= 45 + 5


def volume_with_ball(position: str, centre_lps=(10.0, -20.0, 30.0), radius=15.0, spacing=(2.0, 0.9, 1.3)) -> Volume:
    """A water ball in air at ``centre_lps`` on a grid in the given patient position."""
    shape = (40, 90, 70)
    row, col = (np.array(v, float) for v in ORIENTATIONS[position])
    normal = np.cross(row, col)
    affine = np.eye(4)
    affine[:3, 2] = row * spacing[2]
    affine[:3, 1] = col * spacing[1]
    affine[:3, 0] = normal * spacing[0]
    # put the grid's centre near the ball's centre
    centre_index = (np.array(shape) - 1) / 2
    affine[:3, 3] = np.array(centre_lps) - affine[:3, :3] @ centre_index + 3.0
    vol = Volume(array=np.full(shape, -1000.0, np.float32), affine=affine, series_instance_uid=position)
    kji = np.indices(shape).reshape(3, -1).T
    d = np.linalg.norm(vol.index_to_lps(kji) - centre_lps, axis=1).reshape(shape)
    vol.array[d <= radius] = 0.0
    return vol


@pytest.mark.parametrize("position", sorted(ORIENTATIONS))
def test_segment_returns_the_structure_where_the_model_saw_it(position):
    """A fake model that calls 'PTV_High' wherever the image is water: the mask must be the
    ball, on the patient grid, at the ball's physical position, whatever the orientation."""
    vol = volume_with_ball(position)
    lo, hi = model().window_hu
    half_way = (-400 - lo) / (hi - lo)  # between air and water, inside the window: the ball's edge
    backend = FakeBackend(model(), lambda x: (20.0 * (x - half_way)).astype(np.float32))
    masks = Segmenter(model(), backend).predict(vol)
    mask = masks["PTV_High"]
    truth = vol.array > -500
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.93  # a 15 mm ball seen on the 4 mm model grid
    centroid = vol.index_to_lps(np.argwhere(mask).mean(0)[None])[0]
    np.testing.assert_allclose(centroid, (10.0, -20.0, 30.0), atol=0.3)


def test_softmax_labels_are_mutually_exclusive():
    vol = volume_with_ball("HFS")
    labels = ("Brainstem", "SpinalCord")

    def fn(x):
        # background, then two overlapping 'organs' with different confidence
        bg = np.zeros_like(x)
        return np.concatenate([bg, 10 * (x - 0.2), 12 * (x - 0.2)], 1).astype(np.float32)

    masks = Segmenter(model("softmax", labels), FakeBackend(model("softmax", labels), fn)).predict(vol)
    assert not (masks["Brainstem"] & masks["SpinalCord"]).any()
    assert masks["SpinalCord"].sum() > 0


def test_nothing_found_gives_empty_masks():
    vol = volume_with_ball("HFS")
    masks = Segmenter(model(), FakeBackend(model(), lambda x: np.full_like(x, -10.0))).predict(vol)
    assert masks["PTV_High"].shape == vol.array.shape and not masks["PTV_High"].any()


def _whole_grid_reference(probs, kind, box, step, canon_shape):
    """Every channel interpolated over the whole patient grid, then argmax / > 0.5."""
    positions = tuple(
        np.clip(np.arange(n) / st - b.start, 0, m - 1) for n, st, b, m in zip(canon_shape, step, box, probs.shape[1:])
    )
    inside = [(np.arange(n) / st - b.start >= 0) & (np.arange(n) / st - b.start <= m - 1)
              for n, st, b, m in zip(canon_shape, step, box, probs.shape[1:])]
    full = resample_linear(probs, positions)
    in_crop = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    if kind == "softmax":
        lab = full.argmax(0)
        return [(lab == c) & in_crop for c in range(1, probs.shape[0])]
    return [(full[c] > 0.5) & in_crop for c in range(probs.shape[0])]


@pytest.mark.parametrize("kind,channels,scale,seed", [
    ("softmax", 8, 25.0, 0),  # confident, touching structures
    ("softmax", 8, 2.0, 1),   # flat: winners with p well below 0.5, many-way borders
    ("softmax", 4, 4.0, 2),
    ("sigmoid", 2, 6.0, 3),
])
def test_masks_on_patient_grid_equal_the_whole_grid_argmax(kind, channels, scale, seed):
    """The per-structure boxes give exactly what interpolating every channel everywhere gives,
    on smooth random probabilities with touching, competing structures."""
    rng = np.random.default_rng(seed)
    shape = (14, 17, 19)
    logits = ndimage.gaussian_filter(rng.normal(size=(channels, *shape)), (0, 1.5, 1.5, 1.5)) * scale
    if kind == "softmax":
        e = np.exp(logits - logits.max(0))
        probs = (e / e.sum(0)).astype(np.float32)
    else:
        probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    box = (slice(2, 16), slice(5, 22), slice(0, 19))
    step = np.array([1.0, 3.4, 2.7])
    canon_shape = (20, 80, 56)
    ref = _whole_grid_reference(probs, kind, box, step, canon_shape)
    got = [np.zeros(canon_shape, bool) for _ in ref]
    for c, sl, mask in masks_on_patient_grid(probs, kind, box, step, canon_shape):
        got[c][sl] |= mask
    assert sum(r.sum() for r in ref) > 1000  # the case has structures to find
    for c, (g, r) in enumerate(zip(got, ref)):
        assert np.array_equal(g, r), f"channel {c}: {np.sum(g != r)} voxels differ"


@pytest.mark.parametrize("n_specks", [5, 300])  # a few boxes, and more than _merge_boxes keeps apart
def test_masks_on_patient_grid_with_scattered_specks(n_specks):
    rng = np.random.default_rng(n_specks)
    shape = (14, 17, 19)
    probs = np.full((2, *shape), 0.02, np.float32)
    probs[1, 4:9, 5:10, 6:12] = 0.9  # one structure
    idx = tuple(rng.integers(0, n, n_specks) for n in shape)
    probs[1][idx] = 0.7  # and specks all over
    probs[0] = rng.uniform(0, 0.6, shape).astype(np.float32)
    box = (slice(1, 15), slice(0, 17), slice(3, 22))
    step = np.array([1.5, 2.6, 3.1])
    canon_shape = (24, 50, 75)
    ref = _whole_grid_reference(probs, "sigmoid", box, step, canon_shape)
    got = [np.zeros(canon_shape, bool) for _ in ref]
    for c, sl, mask in masks_on_patient_grid(probs, "sigmoid", box, step, canon_shape):
        got[c][sl] |= mask
    for c, (g, r) in enumerate(zip(got, ref)):
        assert np.array_equal(g, r), f"channel {c}: {np.sum(g != r)} voxels differ"


def test_merge_boxes():
    a = (np.array([0, 0, 0]), np.array([2, 2, 2]))
    touching = (np.array([3, 0, 0]), np.array([5, 1, 1]))  # next to a along the first axis
    apart = (np.array([0, 5, 5]), np.array([1, 6, 6]))
    diagonal = (np.array([6, 2, 2]), np.array([7, 3, 3]))  # touches touching's corner only after the merge
    out = _merge_boxes([a, apart, touching, diagonal])
    as_lists = sorted((lo.tolist(), hi.tolist()) for lo, hi in out)
    assert as_lists == [([0, 0, 0], [7, 3, 3]), ([0, 5, 5], [1, 6, 6])]
    many = [(np.array([3 * i, 0, 0]), np.array([3 * i, 0, 0])) for i in range(100)]
    assert [(lo.tolist(), hi.tolist()) for lo, hi in _merge_boxes(many, max_boxes=64)] == [([0, 0, 0], [297, 0, 0])]


@pytest.mark.parametrize("step", [(1.0, 3.41, 3.41), (2.4, 1.1, 4.1), (0.8, 1.0, 1.0), (1.5, 1.25, 2.0)])
def test_to_model_grid_is_gaussian_anti_aliasing_then_linear_sampling(step):
    """scipy's Gaussian filter (mode nearest, truncate 3) followed by linear sampling at
    m * step, axis by axis, computed in float64 here, on a strided (flipped) view."""
    arr = (np.random.default_rng(5).normal(size=(30, 61, 47)) * 400).astype(np.float32)
    view = arr[::-1, :, ::-1]
    ref = view.astype(np.float64)
    for a, st in enumerate(step):
        if st > 1.2:
            ref = ndimage.gaussian_filter1d(ref, sigma=(st - 1) / 2, axis=a, mode="nearest", truncate=3.0)
        n = int(np.floor((view.shape[a] - 1) / st)) + 1
        pos = np.arange(n) * st
        lo = np.minimum(np.floor(pos).astype(int), view.shape[a] - 1)
        hi = np.minimum(lo + 1, view.shape[a] - 1)
        w = (pos - lo).reshape([-1 if i == a else 1 for i in range(3)])
        ref = np.take(ref, lo, axis=a) * (1 - w) + np.take(ref, hi, axis=a) * w
    out = to_model_grid(view, np.array(step))
    assert out.shape == ref.shape and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, ref, atol=0.02)  # HU; float32 products
