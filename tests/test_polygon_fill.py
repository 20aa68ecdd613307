"""The RTSTRUCT reader's scanline polygon fill against scikit-image's point-in-polygon fill."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import polygon as skimage_polygon

from autocontour.readback import fill_polygon
from autocontour.rtstruct import mask_to_contours


def skimage_fill(r: np.ndarray, c: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, bool)
    rr, cc = skimage_polygon(r, c, shape=shape)
    out[rr, cc] = True
    return out


@pytest.mark.parametrize("seed", range(5))
def test_random_polygons_fill_like_skimage(seed):
    """Random (also self-intersecting) polygons, partly outside the image: the same pixels."""
    rng = np.random.default_rng(seed)
    for _ in range(100):
        n = int(rng.integers(3, 15))
        r, c = rng.uniform(-8, 48, n), rng.uniform(-8, 58, n)
        assert np.array_equal(fill_polygon(r, c, (40, 50)), skimage_fill(r, c, (40, 50)))


def test_marching_squares_outlines_fill_back_exactly():
    rng = np.random.default_rng(7)
    from scipy import ndimage

    mask = ndimage.binary_opening(rng.random((60, 70)) > 0.45, iterations=1)
    affine = np.eye(4)
    filled = np.zeros(mask.shape, bool)
    for points in mask_to_contours(mask, affine, 0):
        filled ^= fill_polygon(points[:, 1], points[:, 2], mask.shape)
    assert np.array_equal(filled, mask)


def test_degenerate_polygons_give_empty_masks():
    assert not fill_polygon(np.array([1.0, 1.0, 1.0]), np.array([0.0, 5.0, 9.0]), (10, 10)).any()  # flat
    assert not fill_polygon(np.array([20.0, 30.0, 25.0]), np.array([1.0, 1.0, 5.0]), (10, 10)).any()  # off image
