"""training.evaluate_dicom: the whole app on OpenKBP patients written as 512 x 512 DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from autocontour.volume import Volume
from training.data import Case
from training.evaluate_dicom import UPSAMPLE, evaluate_dicom, fine_ct, to_coarse, to_fine

ROOT = Path(__file__).resolve().parents[1]


def _case(ct: np.ndarray, spacing=(2.5, 3.906, 3.906)) -> Case:
    return Case("synthetic", ct.astype(np.int16), np.zeros((10, *ct.shape), bool), np.zeros(10, bool), spacing)


def _affine(spacing, origin) -> np.ndarray:
    """Canonical (z, y, x) indices -> LPS, as write_ct_series lays out an HFS series."""
    dz, dy, dx = spacing
    a = np.eye(4)
    a[:3, 0], a[:3, 1], a[:3, 2] = (0, 0, dz), (0, dy, 0), (dx, 0, 0)
    a[:3, 3] = origin
    return a


def test_fine_ct_keeps_the_anatomy_where_it_was():
    """A bright block sits at the same LPS position (intensity-weighted centroid) on the
    4x grid as on the coarse grid whose first voxel centre is at (0, 0, 0), and the fine
    grid covers the same field (its pixels' centres average to the coarse centres)."""
    ct = np.full((6, 16, 16), -1000, np.int16)
    ct[2:4, 5:8, 9:13] = 1000
    spacing = (2.5, 3.906, 3.906)
    fine, fspacing, forigin = fine_ct(_case(ct, spacing))
    assert fine.shape == (6, 16 * UPSAMPLE, 16 * UPSAMPLE)
    assert fspacing == pytest.approx((2.5, 3.906 / UPSAMPLE, 3.906 / UPSAMPLE))
    coarse_vol = Volume(array=ct.astype(np.float32), affine=_affine(spacing, (0, 0, 0)))
    fine_vol = Volume(array=fine, affine=_affine(fspacing, forigin))

    def centroid(vol: Volume) -> np.ndarray:
        w = vol.array + 1000.0
        idx = np.argwhere(w >= 0)
        return vol.index_to_lps((idx * w[w >= 0][:, None]).sum(0, keepdims=True) / w.sum())[0]

    assert np.abs(centroid(fine_vol) - centroid(coarse_vol)).max() < 0.05  # mm
    # the 4 x 4 fine pixels of coarse pixel (j, i) have their centres around its centre
    idx = np.array([[0, j, i] for j in range(4, 8) for i in range(8, 12)])
    assert fine_vol.index_to_lps(idx).mean(0) == pytest.approx(coarse_vol.index_to_lps(np.array([[0, 1, 2]]))[0])


def test_to_coarse_is_the_inverse_of_to_fine_and_needs_half_a_block():
    rng = np.random.default_rng(0)
    mask = rng.random((3, 8, 8)) > 0.5
    assert np.array_equal(to_coarse(to_fine(mask)), mask)
    fine = np.zeros((1, 2 * UPSAMPLE, 2 * UPSAMPLE), bool)
    fine[0, :UPSAMPLE, : UPSAMPLE // 2] = True  # exactly half of coarse pixel (0, 0)
    fine[0, UPSAMPLE:, UPSAMPLE:].flat[: UPSAMPLE * UPSAMPLE // 2 - 1] = True  # one pixel short of half of (1, 1)
    assert fine[0, UPSAMPLE:, UPSAMPLE:].sum() == UPSAMPLE * UPSAMPLE // 2 - 1
    assert to_coarse(fine)[0].tolist() == [[True, False], [False, False]]
    fine[0, -1, -1] = True  # now exactly half
    assert to_coarse(fine)[0].tolist() == [[True, False], [False, True]]


@pytest.mark.slow
def test_app_on_512_dicom_scores_like_the_model_grid_path(shared_data, tmp_path):
    """pt_201 through app.py as a 512 x 512 DICOM CT scores, per structure, within a few
    hundredths of ``training.evaluate --postprocess`` on its 128 grid: a shifted, flipped or
    mis-scaled contour anywhere on the DICOM path would cost far more (a one-voxel shift
    costs the small organs 0.2-0.4, training/results/grid-ceiling-one-voxel-shift-validation.json)."""
    if not (ROOT / "models" / "hn_oar" / "model.yaml").exists():
        pytest.skip("models/hn_oar not trained yet")
    from training.evaluate import evaluate

    data = shared_data / "openkbp" / "validation"
    app = evaluate_dicom(ROOT / "models", ["hn_oar"], data, limit=1, keep=tmp_path)["hn_oar"]
    grid = evaluate(ROOT / "models", ["hn_oar"], data, limit=1, mirror=False, postprocessed=True)["hn_oar"]
    assert app["patients"] == 1 and (tmp_path / "pt_201" / "ct").is_dir()
    a, g = app["headline_dice_per_structure"], grid["headline_dice_per_structure"]
    assert sorted(a) == sorted(g)
    for label in g:
        assert abs(a[label] - g[label]) < 0.06, (label, a[label], g[label])
    assert app["headline_dice_mean"] > grid["headline_dice_mean"] - 0.02
    assert app["dice_fine_grid_headline_mean"] > grid["headline_dice_mean"] - 0.05


def _summary() -> dict:
    return {
        "patients": 2, "headline_dice_per_structure": {"Brainstem": 0.81, "Larynx": 0.6},
        "headline_dice_mean": 0.705, "dice_fine_grid_headline_per_structure": {"Brainstem": 0.79, "Larynx": 0.58},
        "dice_fine_grid_headline_mean": 0.685, "app_seconds_per_patient": 3.8,
        "per_patient_headline_dice": {"pt_1": {"Brainstem": 0.81, "Larynx": 0.6}},
    }


def test_write_stores_the_summary_and_the_card_shows_it_beside_the_model_grid(tmp_path, monkeypatch):
    import shutil

    import yaml

    from training import evaluate_dicom as ed
    from training.model_card import render

    (tmp_path / "models" / "hn_oar").mkdir(parents=True)
    shutil.copy(ROOT / "models" / "hn_oar" / "model.yaml", tmp_path / "models" / "hn_oar" / "model.yaml")
    monkeypatch.setattr(ed, "evaluate_dicom", lambda *a, **k: {"hn_oar": _summary()})
    monkeypatch.setattr("sys.argv", ["evaluate_dicom", "--models", "hn_oar", "--models-dir", str(tmp_path / "models"),
                                     "--write"])
    ed.main()
    meta = yaml.safe_load((tmp_path / "models" / "hn_oar" / "model.yaml").read_text())
    stored = meta[ed.WRITE_KEY]
    assert stored["headline_dice_mean"] == 0.705 and "per_patient_headline_dice" not in stored
    assert stored["command"] == "python -m training.evaluate_dicom --write"
    card = render(meta)
    grid = meta["validation"]["headline_dice_per_structure"]["Brainstem"]
    assert f"| Brainstem | 0.810 | 0.790 | {grid:.3f} |" in card
    assert "Headline mean: **0.705** on the reference grid, 0.685 on the 512 grid" in card
    del meta[ed.WRITE_KEY]
    assert "### Through the whole app" not in render(meta)


@pytest.mark.parametrize("extra", [["--limit", "2"], ["--upsampling", "nearest"]])
def test_write_is_refused_for_part_of_the_patients_or_another_upsampling(monkeypatch, extra):
    from training import evaluate_dicom as ed

    monkeypatch.setattr(ed, "evaluate_dicom", lambda *a, **k: pytest.fail("scored before refusing"))
    monkeypatch.setattr("sys.argv", ["evaluate_dicom", *extra, "--write"])
    with pytest.raises(SystemExit, match="all the patients, linearly upsampled"):
        ed.main()


def test_nearest_upsampling_draws_each_pixel_as_a_block_in_the_same_place():
    rng = np.random.default_rng(1)
    ct = rng.integers(-1000, 1000, (2, 8, 8)).astype(np.int16)
    fine, _, origin = fine_ct(_case(ct), order=0)
    assert np.array_equal(fine, to_fine(ct).astype(np.float32))
    assert origin == fine_ct(_case(ct))[2]  # the grid does not depend on the interpolation
