"""GPU telemetry through NVML (``nvidia-ml-py``): which GPU is there, and how it was used.

One path opens NVML: ``NvmlDevice.open``.  Through it, ``probe_gpu`` tells backend
selection which GPU it may use, ``GpuMonitor`` samples memory and utilisation while a GPU
backend runs, and ``gpu_snapshot`` takes one sample for report.json when none did.
Without the library, a driver or a GPU each of them says so and nothing fails.  Every
function takes ``nvml`` (the ``pynvml`` module by default) so tests can pass a fake.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["GpuInfo", "GpuMonitor", "NvmlDevice", "gpu_snapshot", "probe_gpu"]


@dataclass(frozen=True)
class GpuInfo:
    name: str
    index: int = 0
    memory_total_mb: float = 0.0
    driver: str = ""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlDevice:
    """NVML initialised, with the handle of one GPU; ``close()`` shuts NVML down again."""

    def __init__(self, nvml: Any, handle: Any, index: int, name: str):
        self.nvml, self.handle, self.index, self.name = nvml, handle, index, name

    @classmethod
    def open(cls, index: int = 0, nvml: Any = None) -> tuple[NvmlDevice | None, str]:
        """GPU ``index`` opened through NVML, or (None, why not)."""
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                return None, "nvidia-ml-py is not installed"
        try:
            nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
            return None, f"NVML unavailable ({exc}): no NVIDIA driver/GPU"
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(nvml.nvmlDeviceGetName(handle))
        except Exception as exc:  # noqa: BLE001 - no such GPU
            cls._shutdown(nvml)
            return None, f"NVML sees no GPU {index} ({exc})"
        return cls(nvml, handle, index, name), ""

    def memory_mb(self) -> tuple[float, float]:
        """(MB in use on the device, MB in total)."""
        mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return mem.used / 2**20, mem.total / 2**20

    def utilisation_percent(self) -> int:
        return int(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def process_memory_mb(self, pid: int) -> float | None:
        """GPU memory of process ``pid``; None where NVML does not list it (e.g. some containers)."""
        try:
            procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except Exception:  # noqa: BLE001 - not supported: device figures only
            return None
        used = [p.usedGpuMemory for p in procs if p.pid == pid and p.usedGpuMemory is not None]
        return sum(used) / 2**20 if used else None

    def driver_version(self) -> str:
        return _text(self.nvml.nvmlSystemGetDriverVersion())

    def close(self) -> None:
        self._shutdown(self.nvml)

    @staticmethod
    def _shutdown(nvml: Any) -> None:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutdown failure is irrelevant here
            pass


def probe_gpu(nvml: Any = None) -> tuple[GpuInfo | None, str]:
    """The first NVIDIA GPU as NVML sees it, or (None, why not)."""
    device, why = NvmlDevice.open(0, nvml)
    if device is None:
        return None, why
    try:
        return GpuInfo(device.name, device.index, float(device.memory_mb()[1]), device.driver_version()), ""
    except Exception as exc:  # noqa: BLE001 - a GPU NVML cannot read is not used
        return None, f"NVML could not read GPU {device.index} ({exc})"
    finally:
        device.close()


def gpu_snapshot(nvml: Any = None) -> dict | None:
    """GPU name, memory in use and utilisation now (NVML), or None without a GPU."""
    monitor = GpuMonitor.open(nvml=nvml)
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
    show the utilisation of an idle GPU).  Without NVML or a GPU, ``start()`` returns None
    and nothing runs.
    """

    def __init__(self, device: NvmlDevice, interval_s: float):
        self._device, self.name, self.interval_s = device, device.name, interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[tuple[float, int]] = []  # (MB in use on the device, utilisation %)
        self._process_peak_mb: float | None = None  # this process's own, when NVML lists it
        self._pid = os.getpid()
        self._total_mb = 0.0
        self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)

    @classmethod
    def start(cls, index: int = 0, interval_s: float = 0.1, nvml: Any = None) -> GpuMonitor | None:
        """Open GPU ``index`` and sample it every ``interval_s`` until ``stop()``."""
        monitor = cls.open(index, interval_s, nvml)
        if monitor is not None:
            monitor._sample()
            monitor._thread.start()
        return monitor

    @classmethod
    def open(cls, index: int = 0, interval_s: float = 0.1, nvml: Any = None) -> GpuMonitor | None:
        """NVML opened on GPU ``index``, not sampling yet; None without NVML or that GPU."""
        device, why = NvmlDevice.open(index, nvml)
        if device is None:
            logger.debug("no GPU monitor: %s", why)
            return None
        return cls(device, interval_s)

    def _sample(self) -> None:
        try:
            used, total = self._device.memory_mb()
            util = self._device.utilisation_percent()
        except Exception as exc:  # noqa: BLE001 - a failed sample is skipped, not fatal
            logger.debug("GPU sample failed: %s", exc)
            return
        own = self._device.process_memory_mb(self._pid)
        with self._lock:
            self._total_mb = total
            self._samples.append((used, util))
            if own is not None:
                self._process_peak_mb = max(own, self._process_peak_mb or 0.0)

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
        self._device.close()

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
