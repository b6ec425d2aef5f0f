"""GPU telemetry from NVML (nvidia-ml-py) and the kernel's DRM (other GPUs), host telemetry from psutil.

A metric a device lacks is None, never an exception. NVML's per-process lists are costly, so
they are polled at most every ``process_interval`` seconds; drawing reads the cached lists.
With no NVML (no driver, no GPU) the sample carries CPU telemetry and one sentence saying why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from flows.contracts import GpuReading
from flows.gateways import drm, gpus
from tui.providers.models import GpuProcess, GpuSample, HostSample, Telemetry


class PsutilHost:
    """The host's CPU, RAM and disk of the project's filesystem."""

    def __init__(self, disk_path: str = ".", host_name: str = "") -> None:
        """host_name: the process's host setting (else the hostname)."""
        self.disk_path = disk_path
        self.hostname = gpus.host(host_name)
        psutil.cpu_percent(interval=None)

    def sample(self) -> HostSample:
        """One reading; CPU % is since the previous reading."""
        from flows.host.telemetry import host_usage  # with httpx: imported by the live host only, not the demo's

        usage = host_usage(self.disk_path)
        return HostSample(self.hostname, usage["cpu_percent"], int(usage["cpu_count"]), usage["ram_used_gib"],
                          usage["ram_total_gib"], usage["disk_used_gib"], usage["disk_total_gib"])


class NvmlTelemetry:
    """Samples every GPU: NVIDIA's through an NVML module (pynvml, or a fake with the same functions), then the
    others the kernel lists (flows.gateways.drm: AMD read from its driver, any other named with no reader)."""

    def __init__(
        self,
        nvml: Any | None = None,
        host: Any | None = None,
        joiner: Callable[[int], str | None] | None = None,
        process_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sys_root: Path | None = None,
        proc_root: Path = drm.PROC,
    ) -> None:
        """sys_root: where the kernel lists the other GPUs; by default the host's own /sys when NVML is the host's
        own too, none with an injected NVML or a stand-in one (a test's GPUs stand in for all the host's)."""
        self.nvml, self.no_gpu = (nvml, None) if nvml is not None else gpus.load_nvml()
        self.host = host or PsutilHost()
        self.joiner = joiner or (lambda pid: None)
        self.process_interval = process_interval
        self.clock = clock
        self.process_polls = 0
        self._processes: dict[int, tuple[GpuProcess, ...]] = {}
        self._polled_at: float | None = None
        self._count = gpus.count(self.nvml) if self.nvml else 0
        if self.nvml and not self._count:
            self.no_gpu = "No GPU: NVML reports no device on this host; showing CPU only."
        if sys_root is None and nvml is None and not getattr(self.nvml, "STAND_IN", False):
            sys_root = drm.SYS
        self._others, self._proc = (drm.cards(sys_root) if sys_root is not None else []), proc_root
        if self._others:
            self.no_gpu = None  # NVML's absence means nothing on a host whose GPUs are not NVIDIA's

    def sample(self) -> Telemetry:
        """Host and GPUs now; per-process lists are refreshed at most every process_interval."""
        now = self.clock()
        if (self._count or self._others) and (self._polled_at is None or now - self._polled_at >= self.process_interval):
            self._polled_at = now
            self.process_polls += 1
            self._processes = {i: self._gpu_processes(i) for i in range(self._count)}
            self._processes |= self._other_processes()
        gpus = [self._gpu(i) for i in range(self._count or 0)]
        gpus += [gpu_sample(drm.read(card, i), self._processes.get(i, ()))
                 for i, card in enumerate(self._others, start=self._count)]
        return Telemetry(self.host.sample(), tuple(gpus), self.no_gpu)

    def _gpu(self, index: int) -> GpuSample:
        return gpu_sample(gpus.read_gpu(self.nvml, index), self._processes.get(index, ()))

    def _gpu_processes(self, index: int) -> tuple[GpuProcess, ...]:
        return tuple(GpuProcess(pid, mib, run) for pid, mib, run in gpus.gpu_processes(self.nvml, index, self.joiner))

    def _other_processes(self) -> dict[int, tuple[GpuProcess, ...]]:
        if not self._others:
            return {}
        users = drm.processes(self._others, self._proc, self.joiner)
        return {i: tuple(GpuProcess(*user) for user in users.get(card.pci, ()))
                for i, card in enumerate(self._others, start=self._count)}


def gpu_sample(reading: GpuReading, processes: tuple[GpuProcess, ...] | None = None) -> GpuSample:
    """The screen's GpuSample of a GPU reading (flows.contracts), with its processes."""
    if processes is None:
        processes = tuple(GpuProcess(pid, mib, run) for pid, mib, run in reading.processes)
    return GpuSample(reading.index, reading.name, reading.util, reading.mem_used_mib, reading.mem_total_mib,
                     reading.temp_c, reading.power_w, reading.power_limit_w, reading.sm_clock_mhz, reading.mem_clock_mhz,
                     processes, reading.note)
