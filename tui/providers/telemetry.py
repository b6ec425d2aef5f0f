"""GPU telemetry from NVML (nvidia-ml-py) and host telemetry from psutil.

A metric a device lacks is None, never an exception. NVML's per-process lists are costly, so
they are polled at most every ``process_interval`` seconds; drawing reads the cached lists.
With no NVML (no driver, no GPU) the sample carries CPU telemetry and one sentence saying why.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import psutil

from tui.providers.models import GpuProcess, GpuSample, HostSample, Telemetry

GIB = 1024**3
MIB = 1024**2


class PsutilHost:
    """The host's CPU, RAM and disk of the project's filesystem."""

    def __init__(self, disk_path: str = ".") -> None:
        self.disk_path = disk_path
        self.hostname = socket.gethostname()
        psutil.cpu_percent(interval=None)

    def sample(self) -> HostSample:
        """One reading; CPU % is since the previous reading."""
        mem = psutil.virtual_memory()
        disk = psutil.disk_usage(self.disk_path)
        return HostSample(
            self.hostname, psutil.cpu_percent(interval=None), psutil.cpu_count() or 1,
            (mem.total - mem.available) / GIB, mem.total / GIB, disk.used / GIB, disk.total / GIB,
        )


def _load_nvml() -> tuple[Any | None, str | None]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, None
    except Exception as exc:  # no library, no driver, no device: all mean "no GPU" here
        return None, f"No GPU: NVML is not available on this host ({str(exc) or type(exc).__name__}); showing CPU only."


def _get(call: Callable[..., Any], *args: Any) -> Any:
    """NVML call or None when the device does not support it."""
    try:
        return call(*args)
    except Exception:
        return None


class NvmlTelemetry:
    """Samples every GPU through an NVML module (pynvml, or a fake with the same functions)."""

    def __init__(
        self,
        nvml: Any | None = None,
        host: Any | None = None,
        joiner: Callable[[int], str | None] | None = None,
        process_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nvml, self.no_gpu = (nvml, None) if nvml is not None else _load_nvml()
        self.host = host or PsutilHost()
        self.joiner = joiner or (lambda pid: None)
        self.process_interval = process_interval
        self.clock = clock
        self.process_polls = 0
        self._processes: dict[int, tuple[GpuProcess, ...]] = {}
        self._polled_at: float | None = None
        self._count = _get(self.nvml.nvmlDeviceGetCount) if self.nvml else 0
        if self.nvml and not self._count:
            self.no_gpu = "No GPU: NVML reports no device on this host; showing CPU only."

    def sample(self) -> Telemetry:
        """Host and GPUs now; per-process lists are refreshed at most every process_interval."""
        now = self.clock()
        if self._count and (self._polled_at is None or now - self._polled_at >= self.process_interval):
            self._polled_at = now
            self.process_polls += 1
            self._processes = {i: self._gpu_processes(i) for i in range(self._count)}
        gpus = tuple(self._gpu(i) for i in range(self._count or 0))
        return Telemetry(self.host.sample(), gpus, self.no_gpu)

    def _gpu(self, index: int) -> GpuSample:
        n = self.nvml
        h = n.nvmlDeviceGetHandleByIndex(index)
        name = _get(n.nvmlDeviceGetName, h) or f"GPU {index}"
        util = _get(n.nvmlDeviceGetUtilizationRates, h)
        mem = _get(n.nvmlDeviceGetMemoryInfo, h)
        power = _get(n.nvmlDeviceGetPowerUsage, h)
        limit = _get(n.nvmlDeviceGetEnforcedPowerManagementLimit, h)
        return GpuSample(
            index, name.decode() if isinstance(name, bytes) else str(name),
            util.gpu if util is not None else None,
            mem.used / MIB if mem is not None else None, mem.total / MIB if mem is not None else None,
            _get(n.nvmlDeviceGetTemperature, h, 0),
            power / 1000 if power is not None else None, limit / 1000 if limit is not None else None,
            _get(n.nvmlDeviceGetClockInfo, h, 1), _get(n.nvmlDeviceGetClockInfo, h, 2),
            self._processes.get(index, ()),
        )

    def _gpu_processes(self, index: int) -> tuple[GpuProcess, ...]:
        h = self.nvml.nvmlDeviceGetHandleByIndex(index)
        procs = _get(self.nvml.nvmlDeviceGetComputeRunningProcesses, h) or []
        own = os.getpid()
        return tuple(
            GpuProcess(p.pid, (p.usedGpuMemory / MIB) if p.usedGpuMemory else None, self.joiner(p.pid))
            for p in procs if p.pid != own
        )
