"""The grid ceiling (training/grid_ceiling.py): a perfect model through the app's resampling."""

from __future__ import annotations

import numpy as np

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
