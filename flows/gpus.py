"""Which GPUs of this host are really free (NVML), and the Prefect slot names that guard them.

``TUNEDECK_FAKE_GPUS=N`` stands in N idle GPUs for tests and CPU-only demos (the fake sits
behind ``gpu_states`` like the dashboard's fakes); a host without NVML has no GPUs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

MAX_USED_FRACTION = 0.10  # a GPU with more memory in use than this is busy
MAX_UTILISATION = 10  # percent


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


def gpu_states() -> list[GpuState]:
    """Every GPU of this host (NVML indices), empty without NVML."""
    fake = os.environ.get("TUNEDECK_FAKE_GPUS")
    if fake:
        return [GpuState(i, 0.0, 0) for i in range(int(fake))]
    try:
        import pynvml

        pynvml.nvmlInit()
        states = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            states.append(GpuState(i, memory.used / max(memory.total, 1), util))
        return states
    except Exception:  # noqa: BLE001 - no driver or library: a CPU host
        return []


def host() -> str:
    """This host's name, as slot names use it."""
    return os.environ.get("TUNEDECK_HOST") or socket.gethostname()


def slot_name(gpu: int | None) -> str:
    """The Prefect global concurrency limit (1 slot) that guards one GPU, or this host's CPU."""
    return f"tunedeck-{host()}-gpu{gpu}" if gpu is not None else f"tunedeck-{host()}-cpu"
