"""The grid ceiling (training/grid_ceiling.py): a perfect model through the app's resampling."""

from __future__ import annotations

import numpy as np
import pytest

from autocontour.volume import Volume
from training.grid_ceiling import ceiling_masks


def _volume(shape, spacing_zyx) -> Volume:
    affine = np.eye(4)
    affine[:3, 0] = (0, 0, spacing_zyx[0])
    affine[:3, 1] = (0, spacing_zyx[1], 0)
    affine[:3, 2] = (spacing_zyx[2], 0, 0)
    return Volume(array=np.zeros(shape, np.float32), affine=affine, series_instance_uid="1.2.3")


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_on_its_own_grid_a_perfect_model_is_exact_and_a_coarser_grid_loses_thin_structures():
    vol = _volume((24, 40, 40), (2.0, 2.0, 2.0))
    ball = np.zeros(vol.array.shape, bool)
    zz, yy, xx = np.ogrid[:24, :40, :40]
    ball[(zz - 12) ** 2 + (yy - 20) ** 2 + (xx - 14) ** 2 <= 36] = True
    sheet = np.zeros(vol.array.shape, bool)
    sheet[4:20, 10:30, 30] = True  # one voxel (2 mm) thin
    refs = {"Ball": ball, "Sheet": sheet}
    for kind in ("softmax", "sigmoid"):
        same = ceiling_masks(refs, vol, (2.0, 2.0, 2.0), kind)
        assert np.array_equal(same["Ball"], ball) and np.array_equal(same["Sheet"], sheet), kind
        coarse = ceiling_masks(refs, vol, (4.0, 8.0, 8.0), kind)
        assert _dice(coarse["Ball"], ball) > 0.8, kind  # a 12 mm ball survives an 8 mm grid, roughly
        assert _dice(coarse["Sheet"], sheet) < 0.5, kind  # a 2 mm sheet does not


def test_one_voxel_in_plane_costs_a_four_voxel_square_a_quarter_of_its_dice():
    from training.grid_ceiling import one_voxel_shift_dice

    ref = np.zeros((10, 20, 20), bool)
    ref[2:8, 8:12, 8:12] = True  # a 4 x 4 column: moved by one, 12 of 16 voxels still overlap
    assert one_voxel_shift_dice(ref, partial=False) == 0.75
    edge = np.zeros((10, 20, 20), bool)
    edge[2:8, 0:4, 8:12] = True  # at the border, the row moved off the grid is lost:
    # towards it 12 moved voxels all overlap (24 / 28), the three other ways 0.75
    assert one_voxel_shift_dice(edge, partial=False) == pytest.approx((3 * 0.75 + 24 / 28) / 4)
    # partial-length: scored on the reference's slices only, so the same figure
    assert one_voxel_shift_dice(ref, partial=True) == 0.75
