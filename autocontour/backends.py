"""Inference backends behind one small interface, chosen automatically.

Order of preference (``auto``): TensorRT (ONNX Runtime's TensorRT execution provider,
FP16, engines cached in the work directory), CUDA (ONNX Runtime's CUDA EP), CPU (ONNX
Runtime's default EP).  A GPU path is tried only when NVML (``nvidia-ml-py``) sees an
NVIDIA GPU; each path that cannot be used is skipped with its reason logged, and if none
loads the ModelError lists what each one needs.  ``fake`` is a test double.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from autocontour.errors import InferenceError, ModelError
from autocontour.model_config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "BackendUnavailable",
    "GpuInfo",
    "probe_gpu",
    "select_backend",
    "register_backend",
    "BACKENDS",
    "trt_cache_dir",
    "gpu_snapshot",
    "GpuMonitor",
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


@dataclass(frozen=True)
class GpuInfo:
    name: str
    index: int = 0
    memory_total_mb: float = 0.0
    driver: str = ""


def probe_gpu() -> tuple[GpuInfo | None, str]:
    """The first NVIDIA GPU as NVML sees it, or (None, why not)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"NVML unavailable ({exc}): no NVIDIA driver/GPU"
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None, "NVML sees no GPU"
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        name = name.decode() if isinstance(name, bytes) else str(name)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**20
        drv = pynvml.nvmlSystemGetDriverVersion()
        return GpuInfo(name, 0, float(mem), drv.decode() if isinstance(drv, bytes) else str(drv)), ""
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutdown failure is irrelevant here
            pass


def gpu_snapshot() -> dict | None:
    """GPU name, memory in use and utilisation now (NVML), or None without a GPU."""
    monitor = GpuMonitor.open()
    if monitor is None:
        return None
    monitor._sample()
    monitor._close()
    summary = monitor.summary()
    if not summary["samples"]:
        return None
    return {k: summary[k] for k in ("name", "memory_used_mb", "memory_total_mb", "utilisation_percent")}


class GpuMonitor:
    """Samples the GPU's memory in use and utilisation (NVML) in a background thread.

    ``summary()`` gives the last sample plus the peak memory in use (the whole device's,
    and this process's own where NVML lists it) and the highest and mean utilisation seen
    since ``start()``: what report.json records for a GPU run (one sample at the end would
    show the utilisation of an idle GPU).  Without NVML or a GPU,
    ``start()`` returns None and nothing runs.  ``nvml`` replaces the ``pynvml`` module
    (tests pass a fake).
    """

    def __init__(self, nvml, handle, name: str, interval_s: float):
        self._nvml, self._handle, self.name, self.interval_s = nvml, handle, name, interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[tuple[float, int]] = []  # (MB in use on the device, utilisation %)
        self._process_peak_mb: float | None = None  # this process's own, when NVML lists it
        self._pid = os.getpid()
        self._total_mb = 0.0
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)

    @classmethod
    def start(cls, index: int = 0, interval_s: float = 0.1, nvml=None) -> GpuMonitor | None:
        """Open GPU ``index`` and sample it every ``interval_s`` until ``stop()``."""
        monitor = cls.open(index, interval_s, nvml)
        if monitor is not None:
            monitor._sample()
            monitor._thread.start()
        return monitor

    @classmethod
    def open(cls, index: int = 0, interval_s: float = 0.1, nvml=None) -> GpuMonitor | None:
        """NVML opened on GPU ``index``, not sampling yet; None without NVML or that GPU."""
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no NVML / no driver: nothing to monitor
            logger.debug("no GPU monitor: %s", exc)
            return None
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
        except Exception as exc:  # noqa: BLE001 - no such GPU
            logger.debug("no GPU monitor: %s", exc)
            try:
                nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            return None
        return cls(nvml, handle, name.decode() if isinstance(name, bytes) else str(name), interval_s)

    def _sample(self) -> None:
        try:
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        except Exception as exc:  # noqa: BLE001 - a failed sample is skipped, not fatal
            logger.debug("GPU sample failed: %s", exc)
            return
        own = self._process_memory_mb()
        with self._lock:
            self._total_mb = mem.total / 2**20
            self._samples.append((mem.used / 2**20, int(util.gpu)))
            if own is not None:
                self._process_peak_mb = max(own, self._process_peak_mb or 0.0)

    def _process_memory_mb(self) -> float | None:
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except Exception:  # noqa: BLE001 - not supported (e.g. some containers): device figures only
            return None
        used = [p.usedGpuMemory for p in procs if p.pid == self._pid and p.usedGpuMemory is not None]
        return sum(used) / 2**20 if used else None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def stop(self) -> None:
        """Stop sampling (takes one last sample) and release NVML; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5 * self.interval_s + 1)
        self._sample()
        self._close()

    def _close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutdown failure is irrelevant here
            pass

    def summary(self) -> dict:
        with self._lock:
            samples = list(self._samples)
        if not samples:
            return {"name": self.name, "samples": 0}
        used = [m for m, _ in samples]
        util = [u for _, u in samples]
        return {
            "name": self.name,
            "memory_used_mb": round(used[-1], 1),
            "memory_total_mb": round(self._total_mb, 1),
            "utilisation_percent": util[-1],
            "peak_memory_used_mb": round(max(used), 1),
            "peak_process_memory_mb": None if self._process_peak_mb is None else round(self._process_peak_mb, 1),
            "max_utilisation_percent": max(util),
            "mean_utilisation_percent": round(sum(util) / len(util), 1),
            "samples": len(samples),
            "sample_interval_s": self.interval_s,
        }


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


class FakeBackend:
    """Test double: logits from a function of the input (default: all background)."""

    name = "fake"

    def __init__(self, model: ModelConfig, fn: Callable[[np.ndarray], np.ndarray] | None = None):
        self.model = model
        self.fn = fn or (lambda x: np.zeros((x.shape[0], model.output_count, *x.shape[2:]), np.float32))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.fn(x)


# name -> factory, in "auto" preference order
BACKENDS: dict[str, Callable[[BackendContext], Backend]] = {
    "tensorrt": _make_tensorrt,
    "cuda": _make_cuda,
    "cpu": _make_cpu,
}


def register_backend(name: str, factory: Callable[[BackendContext], Backend]) -> None:
    """Add (or replace) a backend factory; it joins the end of the ``auto`` order."""
    BACKENDS[name] = factory


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
