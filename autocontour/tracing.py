"""Outlines of a binary mask, slice by slice: marching squares at level 0.5, vectorised.

``trace_slices(mask)`` gives, for every slice ``k`` of a (k, rows, columns) mask, the
closed polygons that ``skimage.measure.find_contours(np.pad(mask[k], 1), 0.5)`` gives
(the same vertices, as cycles), with the closing vertex not repeated and the vertices
that lie on a straight run of edges removed.  It is what the RTSTRUCT writer draws with.

Why not call ``find_contours`` per slice: it assembles the segments in Python, one
dictionary operation per vertex, and an External of a planning CT has about 100 000
vertices on 130 slices (0.5 s); here every step except walking round each polygon is
one numpy operation over the whole volume (about 20 times less).

The construction, on the mask padded by one pixel in-plane (so every outline closes):

* A *cell* is a 2x2 block of pixel centres, corners ``a`` (r, c), ``b`` (r, c+1),
  ``c`` (r+1, c+1), ``d`` (r+1, c), in that clockwise order; its edges are
  ``e0`` a->b, ``e1`` b->c, ``e2`` c->d, ``e3`` d->a.  An edge whose two pixels differ
  holds a vertex at its midpoint (level 0.5 between 0 and 1).
* Walking round the cell, an edge from outside to inside is an *entry*, one from inside
  to outside an *exit*; each maximal run of inside corners has one of each, and one
  segment joins them (entry -> exit).  Where the two inside corners are diagonal (a
  saddle), each is its own run and gets its own segment: pixels that touch only at a
  corner are separate pieces (4-connected inside, 8-connected outside), which is
  ``find_contours``' default (``fully_connected="low"``).
* The neighbouring cell walks a shared edge the other way, so an exit here is an entry
  there: every vertex starts exactly one segment and ends exactly one, and following
  the segments from vertex to vertex goes round each polygon once.  Outlines are
  oriented consistently (inside on the same side), outer boundaries and holes alike.

Marching squares on a binary mask never makes self-intersecting polygons or polygons
that cross each other, and filling the polygons by the even-odd rule at the pixel
centres gives the mask back exactly (``autocontour.readback``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["trace_slices"]

# cell code = a + 2 b + 4 d + 8 c -> the entry edge and exit edge of each of its (at most
# two: saddles) segments, -1 where there is no second segment
_ENTRY = np.full((16, 2), -1, np.int64)
_EXIT = np.full((16, 2), -1, np.int64)


def _build_table() -> None:
    for code in range(1, 15):
        a, b, d, c = ((code >> bit) & 1 for bit in range(4))
        inside = [a, b, c, d]  # clockwise
        saddle = inside in ([1, 0, 1, 0], [0, 1, 0, 1])  # each inside corner is its own run
        n = 0
        for q in range(4):  # corner q ends edge (q - 1) and starts edge q
            if not inside[q] or inside[q - 1]:
                continue  # q does not start a run of inside corners
            last = q
            while not saddle and inside[(last + 1) % 4]:
                last = (last + 1) % 4
            # entry edge before the run, exit edge after it
            _ENTRY[code, n], _EXIT[code, n] = (q - 1) % 4, last
            n += 1


_build_table()

# vertex of edge e of cell (r, c), in doubled coordinates relative to (2 r, 2 c)
_EDGE_DY = np.array([0, 1, 2, 1], np.int64)
_EDGE_DX = np.array([1, 2, 1, 0], np.int64)


def trace_slices(mask: np.ndarray) -> dict[int, list[np.ndarray]]:
    """Closed outlines of every slice of a (k, rows, columns) mask.

    Args:
        mask: 3-D array; nonzero is inside.

    Returns:
        slice index -> one (N, 2) float array of (row, column) vertices per polygon
        (outer boundaries and holes alike, holes by the even-odd rule), N >= 3, vertices
        halfway between an inside and an outside pixel centre, the closing vertex not
        repeated, no vertex on the straight line between its neighbours.  Slices without
        inside pixels are absent.  Polygons of a slice are in the order of their
        top-most, then left-most vertex.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"trace_slices needs a 3-D mask, got shape {mask.shape}")
    inside = mask if mask.dtype == np.bool_ else mask != 0
    if not inside.any():
        return {}
    n_slices, n_rows, n_cols = inside.shape
    padded = np.zeros((n_slices, n_rows + 2, n_cols + 2), np.uint8)
    padded[:, 1:-1, 1:-1] = inside
    # cell code a + 2 b + 4 d + 8 c: the pair code (left + 2 right) of the cell's top row
    # plus 4 times that of its bottom row
    pair = padded[:, :, :-1] + (padded[:, :, 1:] << 1)
    code = pair[:, :-1] + (pair[:, 1:] << 2)
    flat = np.flatnonzero((code - np.uint8(1)) < 14)  # neither all outside (0) nor all inside (15)
    codes = code.ravel()[flat]
    kk, rc = np.divmod(flat, code.shape[1] * code.shape[2])
    rr, cc = np.divmod(rc, code.shape[2])
    rows2, cols2 = 2 * padded.shape[1], 2 * padded.shape[2]
    srcs, dsts = [], []
    for n in range(2):  # first and (saddles only) second segment of each cell
        has = _ENTRY[codes, n] >= 0
        entry, exit_ = _ENTRY[codes[has], n], _EXIT[codes[has], n]
        k, y0, x0 = kk[has], 2 * rr[has], 2 * cc[has]
        srcs.append((k * rows2 + y0 + _EDGE_DY[entry]) * cols2 + x0 + _EDGE_DX[entry])
        dsts.append((k * rows2 + y0 + _EDGE_DY[exit_]) * cols2 + x0 + _EDGE_DX[exit_])
    src, dst = np.concatenate(srcs), np.concatenate(dsts)
    order = np.argsort(src, kind="stable")
    key, dst = src[order], dst[order]
    succ = np.searchsorted(key, dst)  # vertex i -> the vertex its segment ends on
    if not np.array_equal(key[succ], dst):
        raise AssertionError("marching squares: a segment ends on no vertex (bug)")

    k_of, yx = np.divmod(key, rows2 * cols2)
    y2, x2 = np.divmod(yx, cols2)
    pred = np.empty_like(succ)
    pred[succ] = np.arange(len(succ))
    dy, dx = y2[succ] - y2, x2[succ] - x2
    keep = (dy != dy[pred]) | (dx != dx[pred])  # the direction turns here

    # go round every polygon at once: label each vertex with the smallest index on its
    # polygon and count its steps to the polygon's last vertex (pointer doubling)
    n = len(succ)
    label = np.arange(n)
    nxt = succ.copy()
    rounds = max(1, int(np.ceil(np.log2(n))))
    for _ in range(rounds):
        np.minimum(label, label[nxt], out=label)
        nxt = nxt[nxt]
    last = succ == label  # the vertex before each polygon's first (smallest) vertex
    steps = (~last).astype(np.int64)
    nxt = np.where(last, np.arange(n), succ)
    for _ in range(rounds):
        steps += steps[nxt]
        nxt = nxt[nxt]
    walk = np.lexsort((-steps, label))  # each polygon from its first vertex round to its last
    walk = walk[keep[walk]]
    starts = np.flatnonzero(np.r_[True, label[walk][1:] != label[walk][:-1]])
    points = np.column_stack((y2[walk] / 2.0 - 1.0, x2[walk] / 2.0 - 1.0))  # unpadded (row, column)
    out: dict[int, list[np.ndarray]] = {}
    for k, polygon in zip(k_of[walk[starts]].tolist(), np.split(points, starts[1:])):
        out.setdefault(k, []).append(polygon)
    return out
