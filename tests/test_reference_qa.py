"""References that cannot be scored (``training.reference_qa``): a contour far from its organ's
cross-section, or a CT with air where an organ lies, is flagged; the figures without them are
reported beside the headline, which stays over every reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from training import reference_qa as qa
from training.data import OPENKBP_ROIS, Case
from training.model_card import render

ROOT = Path(__file__).resolve().parent.parent
OPENKBP = ROOT.parent / "shared/data/openkbp"
SPACING = (3.0, 4.0, 4.0)  # (z, y, x) mm: one voxel is 16 mm^2 in-plane


def _case(masks: dict[str, np.ndarray], ct: np.ndarray | None = None) -> Case:
    shape = next(iter(masks.values())).shape
    stack = np.zeros((len(OPENKBP_ROIS), *shape), bool)
    present = np.zeros(len(OPENKBP_ROIS), bool)
    for name, m in masks.items():
        stack[OPENKBP_ROIS.index(name)] = m
        present[OPENKBP_ROIS.index(name)] = True
    ct = np.full(shape, 40, np.int16) if ct is None else ct
    return Case("pt_x", ct, stack, present, SPACING)


def _box(shape, z, y, x) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[z, y, x] = True
    return m


SHAPE = (40, 64, 64)
MEDIANS = {"SpinalCord": 128.0, "Brainstem": 448.0, "Parotid_L": 496.0}


def test_the_cross_section_is_the_mean_area_on_the_slices_the_contour_occupies():
    cord = _box(SHAPE, slice(5, 35), slice(30, 32), slice(30, 34))  # 2 x 4 voxels a slice, 30 slices
    assert qa.cross_section_mm2(cord, SPACING) == pytest.approx(8 * 16.0)
    assert qa.cross_section_mm2(np.zeros(SHAPE, bool), SPACING) == 0.0


def test_a_cord_reference_many_times_a_cords_cross_section_is_flagged_and_a_normal_one_is_not():
    cord = _box(SHAPE, slice(5, 35), slice(30, 32), slice(30, 34))  # 128 mm^2: the median
    assert qa.flag_case(_case({"SpinalCord": cord}), MEDIANS) == {}
    neck_block = _box(SHAPE, slice(5, 35), slice(30, 46), slice(20, 44))  # 384 voxels, 48 x the median
    flags = qa.flag_case(_case({"SpinalCord": neck_block, "Brainstem": _box(SHAPE, slice(35, 40), slice(0, 4), slice(0, 7))}), MEDIANS)
    assert list(flags) == ["SpinalCord"] and flags["SpinalCord"].startswith("cross-section: 48.00 x")
    # the limit is a factor of AREA_FACTOR either way: 4x is kept, a quarter is kept, less is not
    eight = _box(SHAPE, slice(5, 35), slice(30, 38), slice(30, 38))  # 64 voxels: 8 x the median
    assert "SpinalCord" in qa.flag_case(_case({"SpinalCord": eight}), MEDIANS)
    just = _box(SHAPE, slice(5, 35), slice(30, 34), slice(30, 38))  # 32 voxels = 4 x the median
    assert qa.flag_case(_case({"SpinalCord": just}), MEDIANS) == {}
    sliver = _box(SHAPE, slice(5, 35), 30, 30)  # 16 mm^2 = 1/8
    assert "SpinalCord" in qa.flag_case(_case({"SpinalCord": sliver}), MEDIANS)


def test_a_ct_with_air_where_an_air_free_organ_lies_flags_every_reference_of_the_patient():
    parotid = _box(SHAPE, slice(10, 20), slice(10, 20), slice(10, 16))  # 60 voxels a slice: 960 mm^2, 2x
    ptv = _box(SHAPE, slice(10, 30), slice(20, 40), slice(20, 40))
    ct = np.full(SHAPE, 40, np.int16)
    ct[10:20, 10:20, 10:11] = -1000  # 1/6 of the parotid in air: below the limit
    case = {"LeftParotid": parotid, "PTV70": ptv, "PTV63": ptv, "PTV56": ptv}
    assert qa.flag_case(_case(case, ct), MEDIANS) == {}
    ct[10:20, 10:20, 10:12] = -1000  # a third in air: the CT does not hold the patient there
    flags = qa.flag_case(_case(case, ct), MEDIANS)
    assert set(flags) == {"Parotid_L", "PTV_High", "PTV_Mid", "PTV_Low"}
    assert all(v.startswith("air: 33% of the Parotid_L reference") for v in flags.values())


def test_air_inside_an_organ_that_holds_air_is_not_a_ct_fault():
    ct = np.full(SHAPE, -800, np.int16)  # a larynx full of air is a larynx
    larynx = _box(SHAPE, slice(10, 15), slice(20, 30), slice(20, 30))
    assert qa.flag_case(_case({"Larynx": larynx}, ct), {"Larynx": 1600.0}) == {}


def _result() -> dict:
    return {"per_patient_headline_dice": {
        "pt_1": {"SpinalCord": 0.8, "Larynx": 0.7},
        "pt_2": {"SpinalCord": 0.1, "Larynx": 0.5},
        "pt_3": {"SpinalCord": 0.6},
    }}


def test_the_figures_without_flagged_references_leave_out_exactly_those_patient_structures():
    out = qa.without_flagged(_result(), {"pt_2": {"SpinalCord": "cross-section: 20 x"}})
    assert out["excluded"] == {"SpinalCord": ["pt_2"]}
    assert out["headline_dice_per_structure"] == {"SpinalCord": 0.7, "Larynx": 0.6}
    assert out["headline_dice_mean"] == 0.65 and out["headline_dice_min_structure"] == "Larynx"
    assert qa.without_flagged(_result(), {})["headline_dice_per_structure"]["SpinalCord"] == 0.5


def test_the_model_card_shows_them_beside_the_headline_not_instead():
    meta = yaml.safe_load((ROOT / "models/hn_oar/model.yaml").read_text())
    headline = meta["validation"]["headline_dice_mean"]
    meta["validation"].pop(qa.WITHOUT_FLAGGED, None)
    assert "without the references that cannot be scored" not in render(meta)
    meta["validation"][qa.WITHOUT_FLAGGED] = qa.without_flagged(_result(), {"pt_2": {"SpinalCord": "x"}})
    card = render(meta)
    assert f"Headline mean over structures: **{headline:.3f}**" in card
    assert "mean **0.650** (SpinalCord 0.700, Larynx 0.600); left out: SpinalCord pt_2." in card


def test_evaluate_adds_the_figures_without_flagged_references_when_asked(tmp_path, monkeypatch, capsys):
    from training import evaluate as ev

    flags = tmp_path / "qa.json"
    flags.write_text(json.dumps({"flagged": {"validation": {"pt_2": {"SpinalCord": "cross-section"}}}}))
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: {"hn_oar": _result()})
    out = tmp_path / "r.json"
    monkeypatch.setattr("sys.argv", ["evaluate", "--models", "hn_oar", "--data", str(OPENKBP / "validation"),
                                     "--reference-qa", str(flags), "--json", str(out)])
    ev.main()
    stored = json.loads(out.read_text())["hn_oar"]
    assert stored[qa.WITHOUT_FLAGGED]["excluded"] == {"SpinalCord": ["pt_2"]}
    assert stored["per_patient_headline_dice"] == _result()["per_patient_headline_dice"]  # the rows stay whole


@pytest.mark.skipif(not (OPENKBP / "validation/pt_215.npz").is_file(), reason="needs ../shared/data/openkbp")
def test_on_the_real_references_the_posterior_neck_block_is_flagged_and_a_clean_patient_is_not():
    from training.data import load_openkbp

    medians = qa.organ_medians(sorted((OPENKBP / "train").glob("*.npz"))[:20])
    assert 80 < medians["SpinalCord"] < 200  # a cord is ~1-1.5 cm across
    flags = qa.flag_case(load_openkbp(OPENKBP / "validation/pt_215.npz"), medians)
    assert list(flags) == ["SpinalCord"] and flags["SpinalCord"].startswith("cross-section")
    assert qa.flag_case(load_openkbp(OPENKBP / "validation/pt_201.npz"), medians) == {}
    air = qa.flag_case(load_openkbp(OPENKBP / "validation/pt_221.npz"), medians)
    assert air and all(v.startswith("air") for v in air.values())


def test_the_committed_flags_are_what_the_rules_give():
    """training/results/reference-qa.json is the file evaluate reads: it must hold the current rules."""
    stored = json.loads((ROOT / "training/results/reference-qa.json").read_text())
    assert stored["rules"] == {"area_factor": qa.AREA_FACTOR, "air_hu": qa.AIR_HU,
                               "air_fraction": qa.AIR_FRACTION, "air_free": list(qa.AIR_FREE)}
    assert set(stored["flagged"]["validation"]) == {"pt_206", "pt_215", "pt_216", "pt_221"}


def test_a_missing_flags_file_says_how_to_write_it(tmp_path):
    with pytest.raises(SystemExit, match="python -m training.reference_qa"):
        qa.load_flags(tmp_path / "none.json", "validation")


def test_when_every_reference_is_flagged_nothing_is_left_to_score():
    out = qa.without_flagged({"per_patient_headline_dice": {"pt_1": {"Larynx": 0.7}}}, {"pt_1": {"Larynx": "x"}})
    assert out["headline_dice_mean"] is None and out["excluded"] == {"Larynx": ["pt_1"]}
