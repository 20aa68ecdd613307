"""Inference backends behind one small interface, chosen automatically.

Order of preference (``auto``): TensorRT (ONNX Runtime's TensorRT execution provider,
FP16, engines cached in the work directory), CUDA (ONNX Runtime's CUDA EP), CPU (ONNX
Runtime's default EP).  A GPU path is tried only when NVML (``nvidia-ml-py``, through
``autocontour.gpu``) sees an NVIDIA GPU; each path that cannot be used is skipped with its reason logged, and if none
loads the ModelError lists what each one needs.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from autocontour.errors import InferenceError, ModelError
from autocontour.gpu import GpuInfo, probe_gpu
from autocontour.model_config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "BackendUnavailable",
    "select_backend",
    "BACKENDS",
    "trt_cache_dir",
    "GPU_BACKENDS",
]

GPU_BACKENDS = ("tensorrt", "cuda")  # backends that run on the GPU (report.json samples it)
# windows per network call (autocontour.inference.sliding_window): the last call of a volume
# may hold fewer, so the TensorRT profile spans 1..WINDOW_BATCH
WINDOW_BATCH = 2


class Backend(Protocol):
    name: str

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(N, 1, Z, Y, X) float32 -> (N, C, Z, Y, X) float32 logits."""


class BackendUnavailable(Exception):
    """A backend cannot run here; the message says what it needs."""


def trt_cache_dir(workdir: Path, model: ModelConfig, gpu: GpuInfo, trt_version: str) -> Path:
    """Engine cache folder keyed by model checksum, GPU model and TensorRT version.

    A different model file, GPU or TensorRT release gets a fresh folder, so a stale
    engine is never loaded.
    """
    gpu_key = re.sub(r"[^A-Za-z0-9]+", "-", gpu.name).strip("-")
    trt_key = re.sub(r"[^A-Za-z0-9.]+", "-", trt_version)
    return Path(workdir) / "trt-engines" / f"{model.name}-{model.onnx_sha256[:16]}-{gpu_key}-trt{trt_key}"


class OrtBackend:
    """An ONNX Runtime session on one execution provider."""

    def __init__(self, name: str, model: ModelConfig, providers: list, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or os.cpu_count() or 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # no busy-waiting between kernels: the two model branches run side by side on the
        # graph's worker threads, and spinning intra-op threads would steal the cores the
        # other branch (and the Python stages) need (measured: ~0.4 s and ~0.8 CPU-s less
        # per CT on 2 cores, and steadier times)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model.onnx_path), sess_options=so, providers=providers)
        except Exception as exc:
            raise BackendUnavailable(f"ONNX Runtime could not open {model.onnx_path} on {providers}: {exc}") from exc
        wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if wanted not in self.session.get_providers():
            raise BackendUnavailable(f"{wanted} did not initialise (session runs on {self.session.get_providers()})")
        self.name = name
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(None, {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        except Exception as exc:
            raise InferenceError(f"{self.name} inference failed: {exc}") from exc


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable("onnxruntime is not installed (pip install onnxruntime / onnxruntime-gpu)") from exc
    return ort.get_available_providers()


@dataclass
class BackendContext:
    """What a backend factory may look at: the model, the GPU, the work directory."""

    model: ModelConfig
    workdir: Path
    gpu: GpuInfo | None = None
    gpu_reason: str = ""
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def _make_tensorrt(ctx: BackendContext) -> Backend:
    if ctx.gpu is None:
        raise BackendUnavailable(f"needs an NVIDIA GPU: {ctx.gpu_reason}")
    if "TensorrtExecutionProvider" not in _ort_providers():
        raise BackendUnavailable("needs onnxruntime-gpu built with TensorRT (TensorrtExecutionProvider not available)")
    try:
        import tensorrt

        trt_version = tensorrt.__version__
    except ImportError:  # the TensorRT libraries onnxruntime-gpu was built against: key by its version
        import onnxruntime

        trt_version = f"ort{onnxruntime.__version__}"
    cache = trt_cache_dir(ctx.workdir, ctx.model, ctx.gpu, trt_version)
    cache.mkdir(parents=True, exist_ok=True)
    # one optimisation profile for every batch the sliding window sends (1..WINDOW_BATCH
    # windows of the model's patch): without it TensorRT builds an engine for the first
    # shape seen and rebuilds when a shorter last batch arrives
    pz, py, px = ctx.model.patch_zyx
    name = _onnx_input_name(ctx.model.onnx_path)
    opts = {
        "device_id": ctx.gpu.index,
        "trt_fp16_enable": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": f"{name}:1x1x{pz}x{py}x{px}",
        "trt_profile_opt_shapes": f"{name}:{WINDOW_BATCH}x1x{pz}x{py}x{px}",
        "trt_profile_max_shapes": f"{name}:{WINDOW_BATCH}x1x{pz}x{py}x{px}",
    }
    logger.info("TensorRT engine cache for %s: %s", ctx.model.name, cache)
    return OrtBackend("tensorrt", ctx.model, [("TensorrtExecutionProvider", opts), "CUDAExecutionProvider"])


def _onnx_input_name(path: Path) -> str:
    """The network's input name, read with a CPU session (the GPU session is not open yet)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"]).get_inputs()[0].name
    except Exception as exc:
        raise BackendUnavailable(f"ONNX Runtime could not read the input of {path}: {exc}") from exc


def _make_cuda(ctx: BackendContext) -> Backend:
    if ctx.gpu is None:
        raise BackendUnavailable(f"needs an NVIDIA GPU: {ctx.gpu_reason}")
    if "CUDAExecutionProvider" not in _ort_providers():
        raise BackendUnavailable("needs onnxruntime-gpu (CUDAExecutionProvider not available)")
    return OrtBackend("cuda", ctx.model, [("CUDAExecutionProvider", {"device_id": ctx.gpu.index})])


def _make_cpu(ctx: BackendContext) -> Backend:
    if "CPUExecutionProvider" not in _ort_providers():
        raise BackendUnavailable("onnxruntime has no CPUExecutionProvider")
    return OrtBackend("cpu", ctx.model, ["CPUExecutionProvider"], threads=ctx.threads)


# name -> factory, in "auto" preference order
BACKENDS: dict[str, Callable[[BackendContext], Backend]] = {
    "tensorrt": _make_tensorrt,
    "cuda": _make_cuda,
    "cpu": _make_cpu,
}


def select_backend(
    model: ModelConfig,
    preference: str = "auto",
    workdir: Path | str = ".",
    threads: int | None = None,
    gpu_probe: Callable[[], tuple[GpuInfo | None, str]] = probe_gpu,
) -> tuple[Backend, dict[str, str]]:
    """The first backend that loads, and why each one before it was skipped.

    Raises:
        ModelError: ``preference`` is unknown, or no backend could load (lists each reason).
    """
    if preference != "auto" and preference not in BACKENDS:
        raise ModelError(f"unknown backend {preference!r}; valid: auto, {', '.join(BACKENDS)}")
    gpu, why = gpu_probe()
    if gpu is None:
        logger.info("no GPU backend: %s; using the CPU", why)
    ctx = BackendContext(model, Path(workdir), gpu, why, threads)
    order = list(BACKENDS) if preference == "auto" else [preference]
    skipped: dict[str, str] = {}
    for name in order:
        try:
            backend = BACKENDS[name](ctx)
        except BackendUnavailable as exc:
            skipped[name] = str(exc)
            if gpu is not None or name not in ("tensorrt", "cuda"):
                logger.warning("backend %s unavailable for %s: %s", name, model.name, exc)
            continue
        logger.info("model %s runs on backend %s", model.name, name)
        return backend, skipped
    raise ModelError(
        f"no inference backend could load {model.onnx_path}: "
        + "; ".join(f"{k}: {v}" for k, v in skipped.items())
    )
