"""Clinical-constraint post-processing on small synthetic volumes."""

from __future__ import annotations

import numpy as np
import pytest

from autocontour.postprocess import bounding_box, laterality_flag, postprocess, postprocess_structure
from autocontour.structures import structure
from autocontour.volume import Volume


def test_specks_below_the_minimum_volume_are_removed_and_counted():
    mask = np.zeros((10, 30, 30), bool)
    mask[2:8, 5:20, 5:20] = True  # main body, 1350 voxels
    mask[1, 28, 28] = True  # speck
    res = postprocess_structure(mask, structure("Brainstem"), voxel_cc=0.01)
    assert res.components_removed == 1
    assert not res.mask[1, 28, 28] and res.mask[5, 10, 10]
    assert res.volume_cc == pytest.approx(13.5)


def test_only_the_expected_number_of_components_is_kept():
    mask = np.zeros((10, 40, 40), bool)
    mask[2:8, 2:10, 2:10] = True  # 384 voxels
    mask[2:8, 20:35, 20:35] = True  # 1350 voxels
    res = postprocess_structure(mask, structure("SpinalCord"), voxel_cc=0.01)  # max 1 component
    assert res.mask[5, 25, 25] and not res.mask[5, 5, 5]
    assert res.components_removed == 1 and res.removed_cc == pytest.approx(3.84)


def test_ptv_keeps_several_components():
    mask = np.zeros((10, 40, 40), bool)
    mask[2:8, 2:10, 2:10] = True
    mask[2:8, 20:35, 20:35] = True
    res = postprocess_structure(mask, structure("PTV_High"), voxel_cc=0.01)
    assert res.components_removed == 0 and res.mask.sum() == mask.sum()


def test_enclosed_holes_are_filled_in_organs_not_in_targets():
    mask = np.zeros((5, 20, 20), bool)
    mask[1:4, 5:15, 5:15] = True
    mask[1:4, 9:11, 9:11] = False
    organ = postprocess_structure(mask, structure("Parotid_L"), voxel_cc=0.1)
    assert organ.mask[2, 9:11, 9:11].all() and organ.holes_filled_cc == pytest.approx(1.2)
    target = postprocess_structure(mask, structure("PTV_High"), voxel_cc=0.1)
    assert not target.mask[2, 9:11, 9:11].any()


@pytest.mark.parametrize(
    "name, dx, flagged",
    [("Parotid_L", +40.0, False), ("Parotid_L", -40.0, True), ("Parotid_R", -40.0, False), ("Parotid_R", +40.0, True),
     ("Brainstem", -40.0, False)],
)
def test_laterality_uses_patient_left_as_plus_x(name, dx, flagged):
    flag = laterality_flag(structure(name), np.array([dx + 5.0, 0.0, 0.0]), midline_x=5.0)
    assert (flag is not None) == flagged


def test_postprocess_flags_a_mirrored_parotid_on_a_real_geometry():
    # HFP grid: +i runs to patient RIGHT, so a mask at high i is on the right
    affine = np.eye(4)
    affine[:3, 2] = (-1.0, 0, 0)
    affine[:3, 1] = (0, -1.0, 0)
    affine[:3, 0] = (0, 0, 2.0)
    arr = np.full((10, 60, 60), -1000.0, np.float32)
    arr[:, 10:50, 10:50] = 0  # body centred on i = 29.5
    vol = Volume(arr, affine)
    left = np.zeros(arr.shape, bool)
    left[3:7, 25:35, 40:48] = True  # high i = patient right on HFP
    res = postprocess(vol, {"Parotid_L": left})["Parotid_L"]
    assert any("laterality" in f for f in res.flags)
    assert res.mask.sum() == left.sum()  # flagged, never changed


def test_implausible_volume_and_empty_structure_are_flagged():
    vol = Volume(np.zeros((4, 10, 10), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    tiny = np.zeros((4, 10, 10), bool)
    tiny[1:3, 2:6, 2:6] = True  # 0.256 cc: kept (>= 0.1 cc) but far below a brainstem
    res = postprocess(vol, {"Brainstem": tiny, "Larynx": np.zeros_like(tiny)})
    assert any("outside the plausible range" in f for f in res["Brainstem"].flags)
    assert res["Larynx"].flags == ["empty: structure not found"]


@pytest.mark.parametrize("shape,seed", [((7,), 0), ((6, 9), 1), ((5, 8, 11), 2), ((5, 8, 11), 3), ((1, 1, 1), 4)])
def test_bounding_box_is_the_extent_of_the_true_voxels(shape, seed):
    mask = np.random.default_rng(seed).random(shape) > 0.93
    idx = np.argwhere(mask)
    expected = tuple(slice(int(a), int(b) + 1) for a, b in zip(idx.min(0), idx.max(0))) if len(idx) else None
    assert bounding_box(mask) == expected
    assert bounding_box(np.zeros(shape, bool)) is None

