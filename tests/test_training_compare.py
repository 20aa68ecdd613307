"""Paired comparison of two models' per-patient Dice (training/compare.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.compare import load, paired_bootstrap, verdict


def _results(seed: int = 0, patients: int = 30) -> dict[str, dict[str, float]]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(patients):
        row = {"Brainstem": float(rng.uniform(0.6, 0.9)), "Larynx": float(rng.uniform(0.4, 0.8))}
        if i % 3 == 0:  # a structure only some patients have
            row["Esophagus"] = float(rng.uniform(0.3, 0.7))
        out[f"pt_{i}"] = row
    return out


def test_the_same_model_differs_by_nothing():
    a = _results()
    r = paired_bootstrap(a, a, resamples=500)
    assert r["headline"] == {"mean_difference": 0.0, "ci95": [0.0, 0.0]}
    assert r["structures"]["Esophagus"]["cases"] == 10 and r["structures"]["Brainstem"]["cases"] == 30
    assert "no difference beyond noise" in verdict(r)


def test_a_shift_on_one_structure_is_found_and_the_rest_is_noise():
    a = _results(0)
    sign = {p: (-1) ** i for i, p in enumerate(a)}  # the other structures: +-0.05, zero on the mean
    b = {p: {s: d + (0.05 if s == "Larynx" else 0.05 * sign[p]) for s, d in row.items()} for p, row in a.items()}
    r = paired_bootstrap(a, b, resamples=2000)
    lar = r["structures"]["Larynx"]
    assert lar["mean_difference"] == pytest.approx(0.05) and lar["ci95"] == pytest.approx([0.05, 0.05])
    assert lar["better"] == 30 and lar["worse"] == 0
    lo, hi = r["structures"]["Brainstem"]["ci95"]
    assert lo < 0 < hi and r["structures"]["Brainstem"]["better"] == 15  # noise: the interval straddles zero
    assert "reliably better with B: Larynx" in verdict(r)
    worse = {p: {s: d - 0.1 for s, d in row.items()} for p, row in a.items()}
    assert verdict(paired_bootstrap(a, worse, resamples=500)).split(":")[1].strip().startswith("B is worse")


def test_only_shared_patients_are_compared(tmp_path):
    a, b = _results(0, 30), _results(1, 20)
    assert paired_bootstrap(a, b, resamples=100)["patients"] == 20
    with pytest.raises(ValueError, match="share no patient"):
        paired_bootstrap({"pt_1": {"Larynx": 0.5}}, {"pt_2": {"Larynx": 0.5}})
    f = tmp_path / "old.json"
    f.write_text(json.dumps({"hn_oar": {"headline_dice_mean": 0.7}}))
    with pytest.raises(SystemExit, match="no per-patient figures"):
        load(f, "hn_oar")
    with pytest.raises(SystemExit, match="no result for model 'hn_target'"):
        load(f, "hn_target")
