"""Backend selection: GPU paths chosen when the hardware is there, CPU fallback with reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from autocontour import backends
from autocontour.backends import BackendUnavailable, select_backend, trt_cache_dir
from autocontour.errors import ModelError
from autocontour.gpu import GpuInfo
from autocontour.model_config import ModelConfig

MODEL = ModelConfig("m", "1", Path("."), "x.onnx", "ab" * 32, "sigmoid", ("PTV_High",), (3.0, 4.0, 4.0),
                    (-500.0, 1000.0), (16, 16, 16))
H100 = GpuInfo("NVIDIA H100 80GB HBM3", 0, 81559.0, "580.159.04")


class Made:
    def __init__(self, name):
        self.name = name

    def predict(self, x):
        return x


@pytest.fixture
def fake_factories(monkeypatch):
    """Factories that record the call and succeed/fail by the provider list given."""
    calls = []

    def install(providers: set[str]):
        def factory(name, needs_gpu, provider):
            def make(ctx):
                calls.append(name)
                if needs_gpu and ctx.gpu is None:
                    raise BackendUnavailable(f"needs an NVIDIA GPU: {ctx.gpu_reason}")
                if provider not in providers:
                    raise BackendUnavailable(f"{provider} not available")
                return Made(name)
            return make

        monkeypatch.setattr(backends, "BACKENDS", {
            "tensorrt": factory("tensorrt", True, "TensorrtExecutionProvider"),
            "cuda": factory("cuda", True, "CUDAExecutionProvider"),
            "cpu": factory("cpu", False, "CPUExecutionProvider"),
        })
        return calls

    return install


ALL = {"TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"}


@pytest.mark.parametrize(
    "gpu, providers, chosen, skipped",
    [
        (H100, ALL, "tensorrt", []),
        (H100, ALL - {"TensorrtExecutionProvider"}, "cuda", ["tensorrt"]),
        (H100, {"CPUExecutionProvider"}, "cpu", ["tensorrt", "cuda"]),
        (None, ALL, "cpu", ["tensorrt", "cuda"]),
    ],
    ids=["gpu+trt", "gpu-no-trt", "gpu-cpu-only-ort", "no-gpu"],
)
def test_auto_picks_the_fastest_available(fake_factories, gpu, providers, chosen, skipped):
    fake_factories(providers)
    backend, why = select_backend(MODEL, "auto", gpu_probe=lambda: (gpu, "" if gpu else "NVML: no driver"))
    assert backend.name == chosen
    assert sorted(why) == sorted(skipped)
    if gpu is None:
        assert "NVML: no driver" in why["tensorrt"]


def test_no_backend_error_lists_what_each_needs(fake_factories):
    fake_factories(set())
    with pytest.raises(ModelError) as exc:
        select_backend(MODEL, "auto", gpu_probe=lambda: (None, "no NVIDIA driver"))
    msg = str(exc.value)
    for name in ("tensorrt", "cuda", "cpu"):
        assert f"{name}:" in msg
    assert "CPUExecutionProvider not available" in msg


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ModelError, match="valid: auto, tensorrt, cuda, cpu"):
        select_backend(MODEL, "openvino")


def test_forced_gpu_backend_without_gpu_fails_clearly():
    with pytest.raises(ModelError, match="tensorrt: needs an NVIDIA GPU: no driver"):
        select_backend(MODEL, "tensorrt", gpu_probe=lambda: (None, "no driver"))


@pytest.mark.parametrize(
    "change, same",
    [({}, True), ({"sha": "cd" * 32}, False), ({"gpu": "NVIDIA H200"}, False), ({"trt": "10.4.0"}, False)],
)
def test_trt_engine_cache_is_keyed_by_model_gpu_and_version(tmp_path, change, same):
    base = trt_cache_dir(tmp_path, MODEL, H100, "10.3.0")
    model = MODEL if "sha" not in change else ModelConfig(**{**MODEL.__dict__, "onnx_sha256": change["sha"]})
    gpu = H100 if "gpu" not in change else GpuInfo(change["gpu"])
    other = trt_cache_dir(tmp_path, model, gpu, change.get("trt", "10.3.0"))
    assert (base == other) is same
    assert base.parent == tmp_path / "trt-engines" and " " not in base.name


def test_tensorrt_factory_configures_fp16_and_the_keyed_cache(monkeypatch, tmp_path):
    seen = {}

    class FakeOrt:
        def __init__(self, name, model, providers, threads=None):
            seen["providers"] = providers
            self.name = name

    monkeypatch.setattr(backends, "_ort_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    monkeypatch.setattr(backends, "OrtBackend", FakeOrt)
    monkeypatch.setattr(backends, "_onnx_input_name", lambda path: "image")
    ctx = backends.BackendContext(MODEL, tmp_path, H100)
    b = backends._make_tensorrt(ctx)
    trt, opts = seen["providers"][0]
    assert b.name == "tensorrt" and trt == "TensorrtExecutionProvider"
    assert opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"]
    # one profile for every batch the sliding window sends: 1 to WINDOW_BATCH patches
    assert opts["trt_profile_min_shapes"] == "image:1x1x16x16x16"
    most = f"image:{backends.WINDOW_BATCH}x1x16x16x16"
    assert opts["trt_profile_max_shapes"] == opts["trt_profile_opt_shapes"] == most
    assert Path(opts["trt_engine_cache_path"]).is_dir()
    assert Path(opts["trt_engine_cache_path"]).parent == tmp_path / "trt-engines"
    assert seen["providers"][1] == "CUDAExecutionProvider"  # fallback inside the session


def test_cpu_session_threads_do_not_spin(tmp_path):
    """Both model branches run at once on the graph's workers: ONNX Runtime's intra-op
    threads must sleep, not busy-wait, between kernels."""
    from autocontour.model_config import load_model_config

    root = Path(__file__).resolve().parents[1] / "models" / "hn_target"
    if not (root / "model.yaml").exists():
        pytest.skip("models/hn_target not present")
    backend, _ = select_backend(load_model_config(root), "cpu", tmp_path)
    opts = backend.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads >= 1


def test_onnx_input_name_of_the_shipped_models():
    from autocontour.model_config import load_models

    models = load_models(Path(__file__).resolve().parents[1] / "models")
    assert {m.name: backends._onnx_input_name(m.onnx_path) for m in models} == {"hn_oar": "image", "hn_target": "image"}
    with pytest.raises(BackendUnavailable, match="could not read"):
        backends._onnx_input_name(Path("/nonexistent/model.onnx"))
