"""The one gateway to NVML: which GPUs this host has, how busy they are, who uses them.

Everything that reads a GPU goes through here: the pipeline picking a free GPU, the worker
publishing its host's telemetry, the dashboard's local GPU panel, the trainer choosing a
device, dvclive's system monitor. A metric a device does not report is None, never an error.

Tests (and captures on a machine without a GPU) inject N idle stand-in GPUs here, never through a
setting production code reads: in their own process with ``use(StandInNvml(n))``, in the processes
they start with ``stand_in_env(n, folder)``, which puts a ``pynvml`` with the same functions first
on their path. A host without NVML has no GPUs, and one sentence says why.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.contracts import GpuReading

MAX_USED_FRACTION = 0.10  # a GPU with more memory in use than this is busy
MAX_UTILISATION = 10  # percent
MIB = 1024**2
STAND_IN_WATTS = 100
"""What a stand-in GPU's energy counter says it draws."""


@dataclass(frozen=True)
class GpuState:
    """One GPU as NVML sees it now."""

    index: int
    used_fraction: float
    utilisation: int

    @property
    def free(self) -> bool:
        """Free enough to hand a run."""
        return self.used_fraction <= MAX_USED_FRACTION and self.utilisation <= MAX_UTILISATION


class _Reading:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


class StandInNvml:
    """N idle stand-in GPUs with pynvml's functions: a host for tests without a GPU (use, stand_in_env)."""

    STAND_IN = True

    def __init__(self, count: int) -> None:
        self.count = count

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 - pynvml's names
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:  # noqa: N802
        return "stand-in GPU"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> _Reading:  # noqa: N802
        return _Reading(gpu=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> _Reading:  # noqa: N802
        return _Reading(used=0, total=16 * 1024 * MIB, free=16 * 1024 * MIB)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:  # noqa: N802
        return []

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:  # noqa: N802
        """A counter in mJ as if the GPU drew STAND_IN_WATTS since the epoch: the same in every process, so a test
        knows what a run of T seconds on it used (STAND_IN_WATTS x T)."""
        return int(time.time() * STAND_IN_WATTS * 1000)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("nvmlDevice"):
            def unsupported(*args: Any) -> Any:
                raise RuntimeError("Not Supported on a stand-in GPU")
            return unsupported
        raise AttributeError(name)


_loaded: tuple[Any | None, str | None] | None = None

STAND_IN_MODULE = """\"\"\"A stand-in pynvml: {count} idle GPUs (flows.gateways.gpus.stand_in_env), first on a test's path.\"\"\"
from flows.gateways.gpus import StandInNvml

STAND_IN = True
_GPUS = StandInNvml({count})


def nvmlInit():
    pass


def __getattr__(name):
    return getattr(_GPUS, name)
"""


def load_nvml() -> tuple[Any | None, str | None]:
    """(NVML module, None), or (None, why there is none) in one sentence. Loaded once per process."""
    global _loaded
    if _loaded is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _loaded = (pynvml, None)
        except Exception as exc:  # noqa: BLE001 - no library, no driver, no device: all mean "no GPU" here
            _loaded = (None, f"No GPU: NVML is not available on this host ({str(exc) or type(exc).__name__}); "
                             "showing CPU only.")
    return _loaded


def use(nvml: Any) -> None:
    """This process reads GPUs from nvml from now on (a StandInNvml, in a test)."""
    global _loaded
    _loaded = (nvml, None)


def stand_in_env(count: int, folder: Path) -> dict[str, str]:
    """The environment that gives a process this test starts (and its children) count idle stand-in GPUs: a pynvml
    written into folder, put first on PYTHONPATH."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pynvml.py").write_text(STAND_IN_MODULE.format(count=int(count)))
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)}


def reset() -> None:
    """Forget the loaded NVML (tests that make it fail)."""
    global _loaded
    _loaded = None


def present() -> bool:
    """Whether this host has a real NVML (dvclive's system monitor needs it)."""
    nvml = load_nvml()[0]
    return nvml is not None and not getattr(nvml, "STAND_IN", False)


def get(call: Callable[..., Any], *args: Any) -> Any:
    """An NVML call's answer, or None when the device does not support it."""
    try:
        return call(*args)
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and kin
        return None


def count(nvml: Any) -> int:
    """How many GPUs NVML reports (0 on an error)."""
    return get(nvml.nvmlDeviceGetCount) or 0


def read_gpu(nvml: Any, index: int, processes: list[tuple[int, float | None, str | None]] | None = None) -> GpuReading:
    """One GPU now: utilisation, memory, temperature, power, clocks (None where unsupported)."""
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    name = get(nvml.nvmlDeviceGetName, h) or f"GPU {index}"
    util = get(nvml.nvmlDeviceGetUtilizationRates, h)
    mem = get(nvml.nvmlDeviceGetMemoryInfo, h)
    power = get(nvml.nvmlDeviceGetPowerUsage, h)
    limit = get(nvml.nvmlDeviceGetEnforcedPowerManagementLimit, h)
    return GpuReading(
        index=index, name=name.decode() if isinstance(name, bytes) else str(name),
        util=util.gpu if util is not None else None,
        mem_used_mib=mem.used / MIB if mem is not None else None, mem_total_mib=mem.total / MIB if mem is not None else None,
        temp_c=get(nvml.nvmlDeviceGetTemperature, h, 0),
        power_w=power / 1000 if power is not None else None, power_limit_w=limit / 1000 if limit is not None else None,
        sm_clock_mhz=get(nvml.nvmlDeviceGetClockInfo, h, 1), mem_clock_mhz=get(nvml.nvmlDeviceGetClockInfo, h, 2),
        processes=processes or [],
    )


def gpu_processes(nvml: Any, index: int, joiner: Callable[[int], str | None]) -> list[tuple[int, float | None, str | None]]:
    """(pid, MiB, flow run id) of each compute process on the GPU (this process left out)."""
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    own = os.getpid()
    return [(p.pid, (p.usedGpuMemory / MIB) if p.usedGpuMemory else None, joiner(p.pid))
            for p in get(nvml.nvmlDeviceGetComputeRunningProcesses, h) or [] if p.pid != own]


def gpu_states() -> list[GpuState]:
    """Every GPU of this host (NVML indices) and how busy it is; empty without NVML."""
    nvml, _ = load_nvml()
    if nvml is None:
        return []
    states = []
    for i in range(count(nvml)):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        memory = get(nvml.nvmlDeviceGetMemoryInfo, handle)
        util = get(nvml.nvmlDeviceGetUtilizationRates, handle)
        used = memory.used / max(memory.total, 1) if memory is not None else 0.0
        states.append(GpuState(i, used, util.gpu if util is not None else 0))
    return states


def index_by_uuid(uuid: str) -> int | None:
    """The NVML index of the GPU with this CUDA UUID (torch's device properties name it): CUDA numbers devices its own
    way (fastest first, then CUDA_VISIBLE_DEVICES), NVML by PCI bus. None without NVML or on a stand-in GPU."""
    nvml, _ = load_nvml()
    if nvml is None or getattr(nvml, "STAND_IN", False):
        return None
    handle = get(nvml.nvmlDeviceGetHandleByUUID, uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    return get(nvml.nvmlDeviceGetIndex, handle) if handle is not None else None


def free_bytes_by_uuid(uuid: str) -> int | None:
    """Free memory of the GPU with this CUDA UUID (None without NVML)."""
    nvml, _ = load_nvml()
    if nvml is None or getattr(nvml, "STAND_IN", False):
        return None
    handle = get(nvml.nvmlDeviceGetHandleByUUID, uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    memory = get(nvml.nvmlDeviceGetMemoryInfo, handle) if handle is not None else None
    return int(memory.free) if memory is not None else None


def host(name: str = "") -> str:
    """This host's name, as slot names and telemetry use it: name (the process's host setting), else the hostname."""
    return name or socket.gethostname()


def slot_name(gpu: int | None, host_name: str) -> str:
    """The Prefect global concurrency limit (1 slot) that guards one GPU of host_name, or its (first) CPU slot."""
    return f"tunedeck-{host_name}-gpu{gpu}" if gpu is not None else f"tunedeck-{host_name}-cpu"


def cpu_slot_name(index: int, host_name: str) -> str:
    """The limit of CPU slot index (a worker with --cpu-slots N runs N CPU runs at once); slot 0 is slot_name(None)."""
    return slot_name(None, host_name) if index == 0 else f"tunedeck-{host_name}-cpu{index}"
