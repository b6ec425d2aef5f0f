"""Pick the torch device a stage runs on."""

from __future__ import annotations

import torch

from flows.core.errors import TunedeckError


def free_memory(index: int) -> int:
    """Free bytes on visible CUDA device index, read with NVML (no CUDA context is created).

    The visible device is matched to its NVML handle by UUID, so CUDA_VISIBLE_DEVICES and
    CUDA_DEVICE_ORDER are respected; without NVML, torch's mem_get_info answers instead.
    """
    from flows.gateways.gpus import free_bytes_by_uuid

    free = free_bytes_by_uuid(str(torch.cuda.get_device_properties(index).uuid))
    return free if free is not None else int(torch.cuda.mem_get_info(index)[0])


def xpu_available() -> bool:
    """Whether this torch build sees an Intel GPU (torch.xpu, torch 2.4 and later)."""
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def gpu_kind() -> str:
    """What torch's "cuda" is on this build: rocm (AMD, a HIP build) or cuda (NVIDIA)."""
    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


def resolve_device(spec: str) -> torch.device:
    """base.device to a torch.device: auto picks the CUDA GPU with most free memory (NVIDIA, or AMD: a ROCm build of
    torch calls its GPUs cuda too), then an Intel GPU (xpu), then MPS, then CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            free = [free_memory(i) for i in range(torch.cuda.device_count())]
            return torch.device("cuda", free.index(max(free)))
        if xpu_available():
            return torch.device("xpu", 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TunedeckError(f"base.device is '{spec}' but torch sees no CUDA GPU here: use auto or cpu.")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise TunedeckError(
                f"base.device is '{spec}' but only {torch.cuda.device_count()} CUDA GPU(s) are visible: use cuda:0 or auto."
            )
        return torch.device("cuda", index)
    if spec.startswith("xpu"):
        if not xpu_available():
            raise TunedeckError(f"base.device is '{spec}' but torch sees no Intel GPU (xpu) here: install a torch "
                                "build with XPU support, or use auto or cpu.")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.xpu.device_count():
            raise TunedeckError(
                f"base.device is '{spec}' but only {torch.xpu.device_count()} Intel GPU(s) are visible: use xpu:0 or auto."
            )
        return torch.device("xpu", index)
    if spec == "mps" and not torch.backends.mps.is_available():
        raise TunedeckError("base.device is 'mps' but Apple MPS is not available here: use auto or cpu.")
    return torch.device(spec)
