"""The stray-component rule and the clipping of targets to the External (structure table, postprocess)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from autocontour.postprocess import (
    StructureResult, bounding_box, external_structure, postprocess, postprocess_structure,
)
from autocontour.structures import STRUCTURES, structure
from autocontour.volume import Volume

SPACING = (3.0, 1.0, 1.0)  # (k, j, i) mm
VOXEL_CC = 3.0 / 1000


def ptv_with(second: tuple[slice, slice, slice]) -> np.ndarray:
    """A 324 cc primary PTV (30 slices x 60 x 60 mm) and a second component."""
    mask = np.zeros((80, 200, 300), bool)
    mask[10:40, 70:130, 20:80] = True
    mask[second] = True
    return mask


def test_every_multi_component_structure_has_a_rule_and_organs_keep_one():
    for s in STRUCTURES:
        if s.rt_roi_interpreted_type == "ORGAN":
            assert s.max_components == 1, s.name
        else:
            assert 0 < s.secondary_min_fraction <= 1 and s.secondary_max_gap_mm > 0, s.name


def test_a_real_second_nodal_level_far_from_the_primary_stays():
    # 12 % of the primary (39 cc: 26 slices x 25 x 20 mm), 90 mm lateral to it: a contralateral node level
    mask = ptv_with((slice(12, 38), slice(80, 105), slice(170, 190)))
    res = postprocess_structure(mask, structure("PTV_High"), VOXEL_CC, SPACING)
    assert res.components_removed == 0 and np.array_equal(res.mask, mask)


def test_a_small_node_close_to_the_primary_stays():
    # 3 % of the primary (9.6 cc), 20 mm below it along the neck (gap between nearest voxels)
    mask = ptv_with((slice(47, 55), slice(90, 110), slice(40, 60)))
    res = postprocess_structure(mask, structure("PTV_High"), VOXEL_CC, SPACING)
    assert res.components_removed == 0 and np.array_equal(res.mask, mask)


def test_a_small_far_piece_goes_and_is_explained(caplog):
    # 0.3 % (1.1 cc), 60 mm above the primary: like the model's piece in the brain on hn-chus-052
    piece = (slice(60, 64), slice(90, 100), slice(45, 54))
    mask = ptv_with(piece)
    with caplog.at_level(logging.INFO, logger="autocontour.postprocess"):
        res = postprocess_structure(mask, structure("PTV_High"), VOXEL_CC, SPACING)
    assert not res.mask[piece].any() and res.mask[10:40, 70:130, 20:80].all()
    assert res.components_removed == 1 and res.removed_cc == pytest.approx(4 * 10 * 9 * VOXEL_CC)
    assert "stray component" in res.removals[0] and "more than 30 mm" in res.removals[0]
    assert any("stray component" in r.message for r in caplog.records)


def test_the_rule_measures_millimetres_not_voxels():
    # the same 3 % node, 6 slices (18 mm) below: kept with 3 mm slices, removed with 10 mm slices (60 mm)
    mask = ptv_with((slice(46, 54), slice(90, 110), slice(40, 60)))
    near = postprocess_structure(mask, structure("PTV_High"), VOXEL_CC, (3.0, 1.0, 1.0))
    far = postprocess_structure(mask, structure("PTV_High"), VOXEL_CC, (10.0, 1.0, 1.0))
    assert near.components_removed == 0 and far.components_removed == 1


def test_organs_keep_one_component_even_a_large_second():
    mask = np.zeros((20, 60, 60), bool)
    mask[2:10, 5:25, 5:25] = True
    mask[2:10, 35:50, 35:50] = True  # 56 % of the first
    res = postprocess_structure(mask, structure("Parotid_L"), VOXEL_CC, SPACING)
    assert res.components_removed == 1 and res.mask[5, 10, 10] and not res.mask[5, 40, 40]


def body_volume() -> Volume:
    """A 'patient' (ellipse, 30 HU) in air on a 1 x 1 x 3 mm grid."""
    arr = np.full((20, 120, 160), -1000.0, np.float32)
    j, i = np.mgrid[0:120, 0:160]
    arr[:, (((j - 60) / 45.0) ** 2 + ((i - 80) / 60.0) ** 2) <= 1.0] = 30.0
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, 3.0)
    affine[:3, 1] = (0.0, 1.0, 0.0)
    affine[:3, 2] = (1.0, 0.0, 0.0)
    return Volume(arr, affine)


def test_targets_are_clipped_to_the_external_and_organs_are_not(caplog):
    vol = body_volume()
    ptv = np.zeros(vol.array.shape, bool)
    ptv[5:15, 5:40, 60:100] = True  # its anterior rows stick out of the patient
    organ = ptv.copy()
    with caplog.at_level(logging.INFO, logger="autocontour.postprocess"):
        res = postprocess(vol, {"Parotid_L": organ, "PTV_High": ptv})
    ext = res["External"].mask
    outside = int((ptv & ~ext).sum())
    assert outside > 100
    assert not (res["PTV_High"].mask & ~ext).any()
    assert res["PTV_High"].mask.sum() == ptv.sum() - outside
    assert res["PTV_High"].clipped_cc == pytest.approx(outside * vol.voxel_volume_cc)
    assert any("outside the External clipped" in r.message for r in caplog.records)
    assert res["Parotid_L"].clipped_cc == 0 and (res["Parotid_L"].mask & ~ext).any()
    assert list(res) == ["External", "Parotid_L", "PTV_High"]


def test_nothing_is_clipped_when_no_patient_is_found():
    vol = Volume(np.full((6, 40, 40), -1000.0, np.float32), np.diag([3.0, 1.0, 1.0, 1.0]))
    ptv = np.zeros(vol.array.shape, bool)
    ptv[1:5, 10:30, 10:30] = True
    res = postprocess(vol, {"PTV_High": ptv})
    assert res["External"].flags == ["empty: no patient found above the body threshold"]
    assert np.array_equal(res["PTV_High"].mask, ptv) and res["PTV_High"].clipped_cc == 0


def test_external_can_be_left_out():
    vol = body_volume()
    assert "External" not in postprocess(vol, {}, external=False)


def test_an_external_computed_beside_the_models_is_used_as_given():
    """The app computes the External in its own operator, beside the models."""
    vol = body_volume()
    ptv = np.zeros(vol.array.shape, bool)
    ptv[5:15, 5:40, 60:100] = True
    given = external_structure(vol)
    res = postprocess(vol, {"PTV_High": ptv}, external=given)
    assert res["External"] is given
    here = postprocess(vol, {"PTV_High": ptv})
    assert np.array_equal(res["PTV_High"].mask, here["PTV_High"].mask) and res["PTV_High"].clipped_cc > 0
    assert res["External"].centroid_lps == here["External"].centroid_lps
    with pytest.raises(ValueError, match="External on the volume's grid"):
        postprocess(vol, {}, external=StructureResult("External", np.zeros((2, 2, 2), bool), 0.0))


def two_levels(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """PTV_High and a PTV_Mid that misses High's two last columns (both stick out of the patient)."""
    high = np.zeros(vol.array.shape, bool)
    high[6:12, 15:30, 60:80] = True
    mid = np.zeros_like(high)
    mid[5:13, 14:31, 59:78] = True
    return high, mid


def test_nested_dose_levels_contain_the_higher_ones(caplog):
    """PTV_Mid = PTV63 + PTV70 contains PTV_High and PTV_Low contains PTV_Mid by definition:
    a higher level's voxels outside a lower one are added to it, logged and counted."""
    vol = body_volume()
    high, mid = two_levels(vol)
    low = np.zeros_like(high)
    low[4:14, 12:33, 55:85] = True  # holds both
    with caplog.at_level(logging.INFO, logger="autocontour.postprocess"):
        res = postprocess(vol, {"PTV_High": high, "PTV_Mid": mid, "PTV_Low": low})
    ext = res["External"].mask  # the phantom's targets stick out of it: they are clipped first
    missing = int((res["PTV_High"].mask & ~(mid & ext)).sum())
    assert missing > 100
    assert not (res["PTV_High"].mask & ~res["PTV_Mid"].mask).any()
    assert not (res["PTV_Mid"].mask & ~res["PTV_Low"].mask).any()
    assert res["PTV_Mid"].added_from_contained_cc == pytest.approx(missing * vol.voxel_volume_cc)
    assert res["PTV_Mid"].volume_cc == pytest.approx(((mid | high) & ext).sum() * vol.voxel_volume_cc)
    assert res["PTV_Low"].added_from_contained_cc == 0 and res["PTV_High"].added_from_contained_cc == 0
    assert any("of PTV_High outside it added" in r.message for r in caplog.records)
    # an empty lower level becomes the higher one (the model found the region at one level only)
    res = postprocess(vol, {"PTV_High": high, "PTV_Mid": np.zeros_like(high)})
    assert np.array_equal(res["PTV_Mid"].mask, res["PTV_High"].mask)
    assert "empty: structure not found" not in res["PTV_Mid"].flags
    assert res["PTV_Mid"].centroid_lps == res["PTV_High"].centroid_lps


def test_the_table_lists_a_contained_structure_before_its_container():
    from autocontour.structures import STRUCTURES, structure

    names = [s.name for s in STRUCTURES]
    assert structure("PTV_Mid").contains == ("PTV_High",) and structure("PTV_Low").contains == ("PTV_Mid",)
    for s in STRUCTURES:
        for inner in s.contains:
            assert names.index(inner) < names.index(s.name)


def test_per_model_post_processing_and_merge_equal_one_call(caplog):
    """The app post-processes each model's structures in its own branch (postprocess_masks)
    and merges them (merge_structures): the same masks, volumes, removals and flags as one
    postprocess call, in the table's order; nested levels split across two models are
    completed at the merge and their flags checked again."""
    from autocontour.postprocess import merge_structures, postprocess_masks

    vol = body_volume()
    high, mid = two_levels(vol)
    left = np.zeros_like(high)
    left[6:10, 20:26, 70:78] = True  # patient left is +x: high i
    left[14, 20, 10] = True  # a far speck, removed
    one = postprocess(vol, {"Parotid_L": left, "PTV_High": high, "PTV_Mid": mid})
    ext = external_structure(vol)
    oar = postprocess_masks(vol, {"Parotid_L": left}, ext)
    ptv = postprocess_masks(vol, {"PTV_Mid": mid, "PTV_High": high}, ext)  # any order in, table order out
    assert list(ptv) == ["PTV_High", "PTV_Mid"]
    merged = merge_structures(vol, ext, [ptv, oar])
    assert list(merged) == list(one) == ["External", "Parotid_L", "PTV_High", "PTV_Mid"]
    for name in one:
        a, b = one[name], merged[name]
        assert np.array_equal(a.mask, b.mask), name
        assert (a.volume_cc, a.removals, a.flags, a.centroid_lps, a.added_from_contained_cc) == (
            b.volume_cc, b.removals, b.flags, b.centroid_lps, b.added_from_contained_cc), name
        assert b.box == bounding_box(b.mask), name
    assert merged["Parotid_L"].components_removed == 1
    # the two levels from two models: PTV_Mid is completed at the merge, its flags again
    split = merge_structures(vol, ext, [postprocess_masks(vol, {"PTV_Mid": np.zeros_like(mid)}, ext),
                                        postprocess_masks(vol, {"PTV_High": high}, ext)])
    assert np.array_equal(split["PTV_Mid"].mask, split["PTV_High"].mask)
    assert split["PTV_Mid"].flags == ["volume 4.8 cc outside the plausible range 88.0-1134.7 cc"]  # not "empty"
    assert split["PTV_Mid"].centroid_lps == split["PTV_High"].centroid_lps
    with pytest.raises(ValueError, match="PTV_High comes from two models"):
        merge_structures(vol, ext, [ptv, postprocess_masks(vol, {"PTV_High": high}, ext)])


def test_the_box_is_the_kept_components_own():
    """A far speck that is removed no longer widens the result's box (what the hole filling,
    the centre of mass and the RTSTRUCT tracer read)."""
    mask = np.zeros((40, 100, 300), bool)
    mask[10:30, 40:60, 140:160] = True  # a cord-like organ
    mask[2, 5, 290] = True  # a speck far away
    res = postprocess_structure(mask, structure("SpinalCord"), VOXEL_CC, SPACING)
    assert res.components_removed == 1
    assert res.box == (slice(10, 30), slice(40, 60), slice(140, 160)) == bounding_box(res.mask)
    assert np.allclose(res.centroid_index, [19.5, 49.5, 149.5])
