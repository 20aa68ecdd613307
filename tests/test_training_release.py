"""A release trained on train + validation (``training.train --extra-data``): its own Dice on
the validation patients is not a measure, so ``training.evaluate`` stores the recipe's figures
(a control trained without them) in its model.yaml, and the model card says so."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from training.evaluate import ROOT, recipe_control, trained_on
from training.model_card import render

VALIDATION = ROOT.parent / "shared/data/openkbp/validation"
STAGE = {"iterations": 1800, "lr": 0.0002, "seed": 20261203, "init": "models/hn_oar/model.ts", "extra_data": []}


def _meta(extra: list[str], sha: str = "a" * 64) -> dict:
    meta = yaml.safe_load((ROOT / "models/hn_oar/model.yaml").read_text())
    meta = copy.deepcopy(meta)
    meta["files"]["onnx"]["sha256"] = sha
    meta["training"]["stage"] = {**STAGE, "extra_data": extra}
    meta["training"]["iteration"] = 1500
    return meta


def test_a_model_trained_on_the_validation_folder_is_recognised_by_its_stage():
    assert trained_on(_meta(["../shared/data/openkbp/validation"]), VALIDATION)
    assert not trained_on(_meta([]), VALIDATION)
    assert not trained_on(_meta(["../shared/data/openkbp/validation"]), ROOT.parent / "shared/data/openkbp/train")
    assert not trained_on({"training": {}}, VALIDATION)  # 1.x model.yaml files have no stage


def test_the_recipes_figures_come_from_a_control_of_the_same_stage_without_the_extra_data():
    released, control = _meta(["../shared/data/openkbp/validation"]), _meta([], sha="c" * 64)
    note = recipe_control(control, released, VALIDATION)
    assert note["onnx_sha256"] == "c" * 64 and note["iteration"] == 1500
    assert "without the validation patients" in note["note"]


@pytest.mark.parametrize("case", ["released not trained on it", "control from another stage"])
def test_a_control_that_does_not_measure_the_recipe_is_refused(case):
    released, control = _meta(["../shared/data/openkbp/validation"]), _meta([])
    if case == "released not trained on it":
        released = _meta([])
    else:
        control["training"]["stage"]["lr"] = 0.001
    with pytest.raises(SystemExit, match="--write-recipe-for"):
        recipe_control(control, released, VALIDATION)


def test_the_model_card_says_whose_figures_the_validation_table_holds():
    released, control = _meta(["../shared/data/openkbp/validation"]), _meta([], sha="c" * 64)
    own = render(released)
    assert "## Validation (OpenKBP validation, 33 patients never used in training)" in own
    released["validation"]["recipe_control"] = recipe_control(control, released, VALIDATION)
    card = render(released)
    assert "## Validation of the recipe (OpenKBP validation, 33 patients these weights were also trained on)" in card
    assert "never used in training" not in card.split("## Validation")[1].split("##")[0]
    assert "c" * 64 in card
    assert "The figures below are the recipe's: the same stage trained without the validation patients;" in card


def test_evaluate_refuses_to_store_a_models_own_dice_on_patients_it_was_trained_on(tmp_path, monkeypatch):
    from training import evaluate as ev

    (tmp_path / "hn_oar").mkdir()
    (tmp_path / "hn_oar" / "model.yaml").write_text(yaml.safe_dump(_meta(["../shared/data/openkbp/validation"])))
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("scored before refusing"))
    monkeypatch.setattr("sys.argv", ["evaluate", "--models", "hn_oar", "--models-dir", str(tmp_path),
                                     "--data", str(VALIDATION), "--write"])
    with pytest.raises(SystemExit, match="memory, not validation"):
        ev.main()
    assert Path(tmp_path / "hn_oar" / "model.yaml").read_text().count("recipe_control") == 0


def test_the_last_patients_are_the_trainers_held_out_ones(tmp_path):
    """``training.evaluate --data .../train --last 10`` scores the patients the trainer held out
    (the last ``--holdout`` by patient number, as ``training.data.cached_cases`` orders them)."""
    from training.evaluate import patient_files

    for n in (1, 2, 10, 100, 190, 200):
        (tmp_path / f"pt_{n}.npz").write_bytes(b"")
    assert [p.stem for p in patient_files(tmp_path, last=2)] == ["pt_190", "pt_200"]
    assert [p.stem for p in patient_files(tmp_path, limit=2)] == ["pt_1", "pt_2"]
    assert len(patient_files(tmp_path)) == 6


def test_an_ablation_row_without_a_fair_validation_figure_shows_a_dash():
    meta = _meta([])
    meta["ablation"] = [{"change": "trained on validation", "headline_dice_mean": None, "added": "held-out only",
                         "command": "python -m training.compare"}]
    assert "| trained on validation | - | held-out only |" in render(meta)


def test_evaluate_refuses_a_control_of_another_stage_before_scoring(tmp_path, monkeypatch):
    from training import evaluate as ev

    for folder, meta in (("control", _meta([])), ("released", _meta(["../shared/data/openkbp/validation"]))):
        (tmp_path / folder / "hn_oar").mkdir(parents=True)
        if folder == "control":
            meta["training"]["stage"]["lr"] = 0.001
        (tmp_path / folder / "hn_oar" / "model.yaml").write_text(yaml.safe_dump(meta))
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("scored before refusing"))
    monkeypatch.setattr("sys.argv", ["evaluate", "--models", "hn_oar", "--models-dir", str(tmp_path / "control"),
                                     "--data", str(VALIDATION), "--write-recipe-for", str(tmp_path / "released")])
    with pytest.raises(SystemExit, match="does not measure the recipe"):
        ev.main()
