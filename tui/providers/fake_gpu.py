"""A fake NVML module with the functions NvmlTelemetry calls, and a fixed host: for --demo, tests, bench.

It counts process-list calls so the bench can check the 2 s polling floor of the real sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tui.providers.models import HostSample

MIB = 1024**2


class FakeNvmlError(Exception):
    """What a metric the device lacks raises (like pynvml.NVMLError_NotSupported)."""


@dataclass
class _Util:
    gpu: int


@dataclass
class _Mem:
    used: int
    total: int


@dataclass
class _Proc:
    pid: int
    usedGpuMemory: int  # noqa: N815 (pynvml's name)


class FakeNvml:
    """Eight H100-like GPUs; runs on GPUs 0-3 (one DDP run on 2 and 3), an orphan process on GPU 5.

    With ``animate`` the readings move with every sample (for --demo); without, they stay fixed.
    """

    def __init__(self, count: int = 8, processes: dict[int, list[tuple[int, int]]] | None = None, animate: bool = False) -> None:
        self.count = count
        self.animate = animate
        self.tick = 0
        self.process_calls = 0
        self.processes = processes if processes is not None else {
            0: [(4101, 61_000)], 1: [(4102, 38_500)], 2: [(4103, 70_200)], 3: [(4104, 70_100)], 5: [(4999, 12_288)],
        }

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        if index == 0:
            self.tick += self.animate
        return index

    def nvmlDeviceGetName(self, h: int) -> str:  # noqa: N802
        return "NVIDIA H100 80GB HBM3"

    def _busy(self, h: int) -> float:
        if h not in self.processes:
            return 0.0
        base = (97, 88, 76, 75, 0, 3)[h] if h < 6 else 0
        return max(0.0, min(100.0, base + 4 * math.sin((self.tick + 3 * h) / 2)))

    def nvmlDeviceGetUtilizationRates(self, h: int) -> _Util:  # noqa: N802
        return _Util(round(self._busy(h)))

    def nvmlDeviceGetMemoryInfo(self, h: int) -> _Mem:  # noqa: N802
        used = sum(m for _, m in self.processes.get(h, ())) + 512
        return _Mem(used * MIB, 81_559 * MIB)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:  # noqa: N802
        return round(32 + self._busy(h) * 0.4)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:  # noqa: N802
        if h == 7:
            raise FakeNvmlError("Not Supported")
        return round((70 + self._busy(h) * 6.2) * 1000)

    def nvmlDeviceGetEnforcedPowerManagementLimit(self, h: int) -> int:  # noqa: N802
        if h == 7:
            raise FakeNvmlError("Not Supported")
        return 700_000

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:  # noqa: N802
        return (1980 if self._busy(h) > 10 else 345) if kind == 1 else 2619

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[_Proc]:  # noqa: N802
        self.process_calls += 1
        return [_Proc(pid, mib * MIB) for pid, mib in self.processes.get(h, ())]


class FakeHost:
    """A fixed host reading."""

    def sample(self) -> HostSample:
        """The same numbers every time (deterministic screens)."""
        return HostSample("gpu-box-1", 23.5, 64, 187.2, 503.8, 1204.0, 3576.0)


class FakeRemoteHosts:
    """Other hosts, as their workers' telemetry events would show them.

    The demo: gpu-box-2 (4 GPUs, one run) and a laptop whose worker stopped an hour ago (stale).
    A fleet (``hosts``): gpu-box-2 … gpu-box-N with ``gpus`` GPUs each, the runs of ``layout`` on
    them. Like the events a worker publishes every few seconds (flows.contracts.TELEMETRY_EVERY_S),
    a host's sample is new only every ``every`` seconds; in between the same one comes back.
    """

    def __init__(self, animate: bool = False, layout=None, hosts: int = 0, gpus: int = 8, every: float = 3.0,
                 clock=None) -> None:
        import time

        from tui.providers.telemetry import NvmlTelemetry

        self.every, self.clock = every, clock or time.monotonic
        self._cached: tuple = ()
        self._at: float | None = None
        if not hosts:
            owners = {5101: "run-0003"}
            self.boxes = {"gpu-box-2": NvmlTelemetry(FakeNvml(4, {0: [(5101, 40_960)]}, animate=animate), FakeHost(), owners.get)}
            self.laptop = True
            return
        from tui.providers.fake_runs import host_runs

        self.boxes, self.laptop = {}, False
        for h in range(2, hosts + 1):
            name = f"gpu-box-{h}"
            on = host_runs(layout, name)
            pids = {gpu: 5000 + 100 * h + gpu for gpu in on}
            owners = {pids[gpu]: run for gpu, run in on.items()}
            nvml = FakeNvml(gpus, {gpu: [(pid, 40_960)] for gpu, pid in pids.items()}, animate=animate)
            self.boxes[name] = NvmlTelemetry(nvml, FakeHost(), owners.get)

    def hosts(self) -> tuple:
        """The hosts now: a new sample of each every `every` seconds, the same objects in between."""
        from tui.providers.models import RemoteHost

        now = self.clock()
        if self._at is not None and now - self._at < self.every:
            return self._cached
        self._at = now
        found = []
        for i, (name, box) in enumerate(self.boxes.items()):
            host = HostSample(name, 41.0, 32, 96.4, 251.6, 640.0, 1788.0)
            found.append(RemoteHost(host, box.sample().gpus, 1.4 + 0.1 * i, False, None, "local"))
        if self.laptop:
            laptop = HostSample("laptop", 0.0, 8, 0.0, 16.0, 0.0, 0.0)
            found.append(RemoteHost(laptop, (), 3600.0, True, "No GPU: NVML is not available on this host.", "laptop"))
        self._cached = tuple(found)
        return self._cached
