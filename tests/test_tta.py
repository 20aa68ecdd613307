"""Test-time mirroring: the patient mirrored left-right, lateral structures swapped back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autocontour.inference import mirror_permutation, mirrored
from autocontour.model_config import ModelConfig
from autocontour.segmenter import Segmenter
from autocontour.structures import mirror_partner
from tests.test_inference import volume_with_ball

LABELS = ("Brainstem", "Parotid_L", "Parotid_R")


def _model(kind="softmax", labels=LABELS) -> ModelConfig:
    return ModelConfig(
        name="fake", version="0", folder=Path("."), onnx_file="none.onnx", onnx_sha256="0" * 64, kind=kind,
        labels=labels, spacing_zyx=(3.0, 4.0, 4.0), window_hu=(-500.0, 1000.0), patch_zyx=(16, 16, 16),
    )


def test_mirror_partner_from_the_structure_table():
    assert mirror_partner("Parotid_L") == "Parotid_R"
    assert mirror_partner("Parotid_R") == "Parotid_L"
    assert mirror_partner("Brainstem") is None and mirror_partner("PTV_High") is None


def test_mirror_permutation_swaps_only_lateral_pairs():
    assert mirror_permutation(_model()) == [0, 1, 3, 2]
    assert mirror_permutation(_model("sigmoid", ("Parotid_R", "PTV_High", "Parotid_L"))) == [2, 1, 0]
    assert mirror_permutation(_model("softmax", ("Parotid_L", "Brainstem"))) == [0, 1, 2]  # no partner: kept


def _lateral_model(x: np.ndarray) -> np.ndarray:
    """Water on the patient's left half of a patch (canonical x = last axis, +x = left) is
    Parotid_L, on the right half Parotid_R; air is background."""
    water = (x > 0.3).astype(np.float32)[:, 0]
    left = np.zeros(x.shape[-1], np.float32)
    left[x.shape[-1] // 2 :] = 1
    out = np.zeros((x.shape[0], 4, *x.shape[2:]), np.float32)
    out[:, 0] = 5 * (1 - water)
    out[:, 2] = 5 * water * left
    out[:, 3] = 5 * water * (1 - left)
    return out


def test_mirroring_a_laterality_aware_model_changes_nothing():
    """Mirroring along patient left-right with the parotid channels swapped agrees with a
    model that knows left from right; along any other axis, or without the swap, it would
    cancel it out (ties)."""
    x = np.random.default_rng(0).random((2, 1, 8, 10, 12)).astype(np.float32)
    perm = mirror_permutation(_model())
    np.testing.assert_allclose(mirrored(_lateral_model, perm)(x), _lateral_model(x), atol=1e-6)
    unswapped = mirrored(_lateral_model, [0, 1, 2, 3])(x)
    assert not np.allclose(unswapped, _lateral_model(x))


def test_mirrored_prediction_is_mirror_equivariant():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 1, 1, 1, 12)).astype(np.float32)  # position-dependent, not symmetric

    def predict(x):
        return (x * w[None, :, 0]).astype(np.float32)

    perm = mirror_permutation(_model())
    f = mirrored(predict, perm)
    x = rng.random((1, 1, 6, 7, 12)).astype(np.float32)
    np.testing.assert_allclose(f(x[..., ::-1].copy()), f(x)[:, perm, ..., ::-1], atol=1e-5)


@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_segment_with_mirroring_keeps_the_structure_in_place(position):
    vol = volume_with_ball(position)
    m = _model("sigmoid", ("PTV_High",))
    lo, hi = m.window_hu
    half_way = (-400 - lo) / (hi - lo)

    class Fake:
        def predict(self, x):
            return (20.0 * (x - half_way)).astype(np.float32)

    a = Segmenter(m, Fake()).predict(vol)["PTV_High"]
    b = Segmenter(m, Fake(), mirror=True).predict(vol)["PTV_High"]
    assert np.array_equal(a, b)
    centroid = vol.index_to_lps(np.argwhere(b).mean(0)[None])[0]
    np.testing.assert_allclose(centroid, (10.0, -20.0, 30.0), atol=0.3)


def test_segmenter_follows_the_models_own_mirroring_setting():
    from dataclasses import replace

    class Fake:
        def predict(self, x):
            return np.zeros((x.shape[0], 4, *x.shape[2:]), np.float32)

    m = _model()
    assert Segmenter(m, Fake()).mirror is False
    assert Segmenter(replace(m, test_time_mirroring=True), Fake()).mirror is True
    assert Segmenter(replace(m, test_time_mirroring=True), Fake(), mirror=False).mirror is False


def test_an_ensemble_averages_its_networks_logits_in_place():
    """``Segmenter.members``: two networks that disagree about where the structure is; the
    ensemble's mask is where their mean logit is positive, and it stays put in the patient."""
    vol = volume_with_ball("HFS")
    m = _model("sigmoid", ("PTV_High",))
    lo, hi = m.window_hu
    half_way = (-400 - lo) / (hi - lo)

    class Shifted:
        def __init__(self, bias):
            self.bias = bias

        def predict(self, x):
            return (20.0 * (x - half_way) + self.bias).astype(np.float32)

    alone = Segmenter(m, Shifted(0.0)).predict(vol)["PTV_High"]
    big = Segmenter(m, Shifted(8.0)).predict(vol)["PTV_High"]
    both = Segmenter(m, Shifted(8.0), members=[Shifted(-8.0)]).predict(vol)["PTV_High"]
    assert big.sum() > alone.sum()  # the biased network alone grows the ball
    assert np.array_equal(both, alone)  # the mean of +8 and -8 is the unbiased network
    centroid = vol.index_to_lps(np.argwhere(both).mean(0)[None])[0]
    np.testing.assert_allclose(centroid, (10.0, -20.0, 30.0), atol=0.3)
