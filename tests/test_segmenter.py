"""One Segmenter per model: the output count, the model kind, the shared model-grid cache."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from autocontour import inference
from autocontour.model_config import ModelConfig, ModelKind
from autocontour.segmenter import ModelGridCache, Segmenter
from autocontour.volume import Volume


def model(kind, labels, spacing=(3.0, 4.0, 4.0), name="m") -> ModelConfig:
    return ModelConfig(name=name, version="0", folder=Path("."), onnx_file="none.onnx", onnx_sha256="0" * 64,
                       kind=kind, labels=labels, spacing_zyx=spacing, window_hu=(-500.0, 1000.0),
                       patch_zyx=(8, 8, 8))


def water_block(spacing_kji=(2.0, 1.0, 1.0)) -> Volume:
    """An HFS volume (i -> +x, j -> +y, k -> +z), water in the middle, air around."""
    arr = np.full((16, 24, 24), -1000.0, np.float32)
    arr[4:12, 6:18, 6:18] = 0.0
    affine = np.zeros((4, 4))
    affine[2, 0], affine[1, 1], affine[0, 2] = spacing_kji
    affine[3, 3] = 1.0
    affine[:3, 3] = (-12.0, -12.0, 40.0)
    return Volume(array=arr, affine=affine, series_instance_uid="block")


class CountingBackend:
    """Logits of the right channel count (all background); records the batch shapes."""

    name = "counting"

    def __init__(self, n_out: int):
        self.n_out = n_out
        self.shapes: list[tuple[int, ...]] = []

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.shapes.append(x.shape)
        return np.zeros((x.shape[0], self.n_out, *x.shape[2:]), np.float32)


@pytest.mark.parametrize(
    "kind, labels, count",
    [("softmax", ("Brainstem", "SpinalCord"), 3), ("sigmoid", ("PTV_High",), 1), (ModelKind.SIGMOID, ("A", "B"), 2)],
)
def test_output_count_is_labels_plus_the_softmax_background(kind, labels, count):
    cfg = model(kind, labels)
    assert cfg.kind is ModelKind(kind)  # a plain string becomes the enum
    assert cfg.output_count == count == ModelKind(kind).output_count(len(labels))


def test_unknown_model_kind_is_refused():
    with pytest.raises(ValueError, match="argmax"):
        model("argmax", ("PTV_High",))


def test_predict_asks_the_backend_for_the_models_output_count():
    """A backend returning fewer channels than output_count would break sliding_window:
    the segmenter's count and the backend's agree for both kinds."""
    for cfg in (model("softmax", ("Brainstem", "SpinalCord")), model("sigmoid", ("PTV_High",))):
        backend = CountingBackend(cfg.output_count)
        masks = Segmenter(cfg, backend).predict(water_block())
        assert set(masks) == set(cfg.labels)
        assert all(m.shape == (16, 24, 24) and not m.any() for m in masks.values())
        assert backend.shapes and all(s[1:] == (1, 8, 8, 8) for s in backend.shapes)


def test_segmenters_sharing_a_cache_resample_once_per_volume_and_spacing(monkeypatch):
    calls = []
    original = inference.to_model_grid

    def counted(canon, step):
        calls.append(tuple(np.round(step, 6)))
        return original(canon, step)

    monkeypatch.setattr(inference, "to_model_grid", counted)
    cache = ModelGridCache()
    a = Segmenter(model("sigmoid", ("PTV_High",), name="a"), CountingBackend(1), cache)
    b = Segmenter(model("softmax", ("Brainstem",), name="b"), CountingBackend(2), cache)
    c = Segmenter(model("sigmoid", ("PTV_High",), spacing=(2.0, 2.0, 2.0), name="c"), CountingBackend(1), cache)
    vol = water_block()
    for s in (a, b, c):
        s.predict(vol)
    # a and b share the 3x4x4 mm grid; c has its own; steps are model spacing / CT spacing
    assert calls == [(1.5, 4.0, 4.0), (1.0, 2.0, 2.0)]
    a.predict(vol)
    assert len(calls) == 2  # reused
    other = water_block()
    a.predict(other)
    assert len(calls) == 3  # a new volume is resampled again (and the old one forgotten)
    cache.clear()
    a.predict(other)
    assert len(calls) == 4


def test_cache_gives_both_threads_one_image():
    cache = ModelGridCache()
    vol = water_block()
    canon = vol.array
    step = np.array([1.5, 4.0, 4.0])
    got: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(vol, canon, step))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] is got[1]
    np.testing.assert_array_equal(got[0], inference.to_model_grid(canon, step))


@pytest.mark.parametrize(("cpus", "concurrent", "n_models", "expected"), [
    (2, 2, 2, 1),  # the app's default on the 2-core machine: one thread per model branch
    (16, 2, 2, 8),
    (2, 1, 2, None),  # one model at a time: every core (ONNX Runtime's default)
    (2, 2, 1, None),  # one model: nothing runs beside it
    (1, 2, 2, 1),
])
def test_cores_are_shared_out_among_models_running_side_by_side(monkeypatch, cpus, concurrent, n_models, expected):
    import autocontour.segmenter as segmenter_module

    seen = []
    monkeypatch.setattr(segmenter_module.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(segmenter_module, "select_backend",
                        lambda model, preference, workdir, threads: (seen.append(threads) or object(), {}))
    monkeypatch.setattr(Segmenter, "__init__", lambda self, *a, **kw: None)
    models = [object()] * n_models
    segmenter_module.open_segmenters(models, concurrent=concurrent)
    assert seen == [expected] * n_models
