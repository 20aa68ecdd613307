"""Model-grid resampling, sliding window and the round trip back to the patient grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autocontour.backends import FakeBackend
from autocontour.inference import body_box, resample_linear, segment, sliding_window
from autocontour.model_config import ModelConfig
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
    masks = segment(vol, model(), backend)
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

    masks = segment(vol, model("softmax", labels), FakeBackend(model("softmax", labels), fn))
    assert not (masks["Brainstem"] & masks["SpinalCord"]).any()
    assert masks["SpinalCord"].sum() > 0


def test_nothing_found_gives_empty_masks():
    vol = volume_with_ball("HFS")
    masks = segment(vol, model(), FakeBackend(model(), lambda x: np.full_like(x, -10.0)))
    assert masks["PTV_High"].shape == vol.array.shape and not masks["PTV_High"].any()
