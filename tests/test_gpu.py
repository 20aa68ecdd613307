"""GPU telemetry (autocontour.gpu): one NVML path for the probe, the monitor and the snapshot,
tested with a fake NVML (and once against this machine's, whatever it has)."""

from __future__ import annotations

import os
import sys
import time

from autocontour import gpu
from autocontour.gpu import GpuInfo


def test_real_probe_on_this_machine_does_not_crash():
    info, why = gpu.probe_gpu()
    assert (info is None) == bool(why)


class FakeNvml:
    """pynvml's calls used by autocontour.gpu, with a scripted memory/utilisation sequence."""

    def __init__(self, used_mb, util, fail_init=False):
        self.used_mb, self.util, self.fail_init = list(used_mb), list(util), fail_init
        self.calls = 0
        self.shut_down = False

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H200"

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = self.used_mb[min(self.calls, len(self.used_mb) - 1)]
        return type("Mem", (), {"used": used * 2**20, "total": 143771 * 2**20})()

    def nvmlDeviceGetUtilizationRates(self, handle):
        util = self.util[min(self.calls, len(self.util) - 1)]
        self.calls += 1
        return type("Util", (), {"gpu": util})()

    def nvmlShutdown(self):
        self.shut_down = True

    def nvmlSystemGetDriverVersion(self):
        return b"580.159.04"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        mb = self.used_mb[min(self.calls, len(self.used_mb) - 1)] // 2
        proc = type("Proc", (), {"pid": os.getpid(), "usedGpuMemory": mb * 2**20})()
        other = type("Proc", (), {"pid": -1, "usedGpuMemory": 10**12})()
        return [other, proc]


def test_gpu_monitor_records_peak_memory_and_utilisation():
    nvml = FakeNvml(used_mb=[500, 2500, 4100, 3000, 900], util=[0, 80, 100, 60, 0])
    monitor = gpu.GpuMonitor.start(interval_s=0.01, nvml=nvml)
    assert monitor is not None
    deadline = time.monotonic() + 5
    while nvml.calls < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    monitor.stop()
    summary = monitor.summary()
    assert summary["name"] == "NVIDIA H200"
    assert summary["peak_memory_used_mb"] == 4100.0
    assert summary["peak_process_memory_mb"] == 2050.0  # this process's own, not the other's
    assert summary["max_utilisation_percent"] == 100
    assert summary["memory_used_mb"] == 900.0 and summary["utilisation_percent"] == 0  # the last sample
    assert summary["memory_total_mb"] == 143771.0
    assert summary["samples"] >= 5
    assert 0 < summary["mean_utilisation_percent"] < 100
    assert nvml.shut_down
    monitor.stop()  # idempotent


def test_gpu_monitor_is_none_without_nvml_or_gpu():
    assert gpu.GpuMonitor.start(nvml=FakeNvml([0], [0], fail_init=True)) is None
    no_gpu = FakeNvml([0], [0])

    def missing(index):
        raise RuntimeError("Invalid Argument")

    no_gpu.nvmlDeviceGetHandleByIndex = missing
    assert gpu.GpuMonitor.start(nvml=no_gpu) is None
    assert no_gpu.shut_down


def test_report_uses_the_monitor_when_a_gpu_ran(tmp_path, monkeypatch):
    from autocontour import report
    from autocontour.report import build_report
    from autocontour.run_record import RunRecord

    record = RunRecord(tmp_path, tmp_path, tmp_path)
    monkeypatch.setattr(report, "gpu_snapshot", lambda: {"snapshot": True})
    assert build_report(record, {})["host"]["gpu"] == {"snapshot": True}  # no monitor: one snapshot
    monitor = gpu.GpuMonitor.start(interval_s=60, nvml=FakeNvml([1234], [7]))
    record.gpu_monitor = monitor
    try:
        host_gpu = build_report(record, {})["host"]["gpu"]
    finally:
        monitor.stop()
    assert host_gpu["peak_memory_used_mb"] == 1234.0 and host_gpu["max_utilisation_percent"] == 7


def test_gpu_snapshot_is_one_sample(monkeypatch):
    nvml = FakeNvml([1500], [42])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu.gpu_snapshot() == {
        "name": "NVIDIA H200", "memory_used_mb": 1500.0, "memory_total_mb": 143771.0, "utilisation_percent": 42,
    }
    assert nvml.shut_down
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([0], [0], fail_init=True))
    assert gpu.gpu_snapshot() is None


def test_probe_reads_the_gpu_through_the_same_path_and_closes_it():
    nvml = FakeNvml([1500], [42])
    assert gpu.probe_gpu(nvml) == (GpuInfo("NVIDIA H200", 0, 143771.0, "580.159.04"), "")
    assert nvml.shut_down


def test_probe_says_why_there_is_no_gpu():
    info, why = gpu.probe_gpu(FakeNvml([0], [0], fail_init=True))
    assert info is None and "NVML unavailable (NVML Shared Library Not Found)" in why
    no_gpu = FakeNvml([0], [0])

    def missing(index):
        raise RuntimeError("Invalid Argument")

    no_gpu.nvmlDeviceGetHandleByIndex = missing
    info, why = gpu.probe_gpu(no_gpu)
    assert info is None and why == "NVML sees no GPU 0 (Invalid Argument)" and no_gpu.shut_down


def test_probe_without_nvidia_ml_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    assert gpu.probe_gpu() == (None, "nvidia-ml-py is not installed")
