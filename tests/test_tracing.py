"""autocontour.tracing: the vectorised marching squares the RTSTRUCT writer draws with.

Checked against scikit-image's ``find_contours`` (the reference implementation of
marching squares) on random masks full of saddles, holes and islands: the same
polygons, vertex for vertex, once the collinear vertices are dropped from both.
"""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import find_contours

from autocontour.tracing import trace_slices


def _drop_collinear(rc: np.ndarray) -> np.ndarray:
    """find_contours' closed polygon without its repeated closing vertex and straight-run vertices."""
    rc = rc[:-1] if np.array_equal(rc[0], rc[-1]) else rc
    d_out = np.roll(rc, -1, axis=0) - rc
    d_in = rc - np.roll(rc, 1, axis=0)
    return rc[np.abs(d_out - d_in).max(axis=1) > 1e-9]


def _canonical(polygon: np.ndarray) -> tuple:
    """A polygon as a cycle of vertices, independent of start vertex and direction."""
    vertices = [tuple(v) for v in np.round(np.asarray(polygon) * 2).astype(int).tolist()]
    forms = []
    for seq in (vertices, vertices[::-1]):
        first = min(range(len(seq)), key=seq.__getitem__)
        forms.append(tuple(seq[first:] + seq[:first]))
    return min(forms)


def _reference(slice_: np.ndarray) -> list[tuple]:
    polygons = [_drop_collinear(rc - 1.0) for rc in find_contours(np.pad(slice_, 1).astype(float), 0.5)]
    return sorted(_canonical(p) for p in polygons)


def _signed_area(rc: np.ndarray) -> float:
    r, c = rc[:, 0], rc[:, 1]
    return 0.5 * float(np.sum(r * np.roll(c, -1) - np.roll(r, -1) * c))


@pytest.mark.parametrize("seed", range(4))
def test_same_polygons_as_find_contours(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        shape = (int(rng.integers(1, 4)), int(rng.integers(1, 25)), int(rng.integers(1, 25)))
        mask = rng.random(shape) > rng.uniform(0.2, 0.8)
        traced = trace_slices(mask)
        for k in range(shape[0]):
            assert sorted(_canonical(p) for p in traced.get(k, [])) == _reference(mask[k]), (seed, shape, k)
        assert set(traced) == {k for k in range(shape[0]) if mask[k].any()}


def test_square_ring_and_single_pixel():
    mask = np.zeros((3, 9, 10), bool)
    mask[0, 2:7, 3:9] = True  # square: 4 sides with cut corners
    mask[1, 1:8, 1:8] = True
    mask[1, 3:6, 3:6] = False  # ring: outer boundary and hole
    mask[2, 4, 4] = True  # one pixel: a diamond
    traced = trace_slices(mask)
    (square,) = traced[0]
    assert len(square) == 8
    assert square[:, 0].min() == 1.5 and square[:, 0].max() == 6.5  # halfway to the outside pixel
    assert len(traced[1]) == 2
    (diamond,) = traced[2]
    assert sorted(map(tuple, diamond.tolist())) == [(3.5, 4.0), (4.0, 3.5), (4.0, 4.5), (4.5, 4.0)]


def test_outlines_are_oriented_consistently():
    """Outer boundaries turn one way and holes the other (inside always on the same side)."""
    mask = np.zeros((1, 12, 12), bool)
    mask[0, 1:11, 1:11] = True
    mask[0, 3:8, 3:8] = False
    mask[0, 5, 5] = True  # an island in the hole
    outer, hole, island = sorted(trace_slices(mask)[0], key=lambda p: -abs(_signed_area(p)))
    assert np.sign(_signed_area(outer)) == np.sign(_signed_area(island)) == -np.sign(_signed_area(hole))


def test_empty_and_bad_input():
    assert trace_slices(np.zeros((2, 4, 4), bool)) == {}
    assert trace_slices(np.zeros((0, 4, 4), bool)) == {}
    with pytest.raises(ValueError, match="3-D"):
        trace_slices(np.zeros((4, 4), bool))
    # nonzero of any dtype is inside
    assert len(trace_slices(np.full((1, 3, 3), 7, np.uint8))[0]) == 1
