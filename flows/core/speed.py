"""Mixed precision, channels_last and torch.compile: resolved once, with a clear word when refused."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from flows.core.errors import TunedeckError

log = logging.getLogger("tunedeck")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for train.precision on device (None: plain fp32)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if precision == "fp16":
        if device.type == "cpu":
            raise TunedeckError("train.precision fp16 needs a CUDA or MPS device: use bf16, fp32 or auto on the CPU.")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TunedeckError(
            f"train.precision bf16 is not supported by {torch.cuda.get_device_name(device)}: use fp16 or auto."
        )
    if device.type == "mps":
        try:
            torch.zeros(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            raise TunedeckError("train.precision bf16 is not supported by this MPS device: use fp16 or auto.") from None
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for one forward pass (a no-op for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def uses_convolutions(model: nn.Module) -> bool:
    """Whether channels_last can help (the model has 2-D convolutions)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile the model when asked and supported; otherwise say why and run eagerly."""
    if not enabled:
        return model
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        log.warning("train.compile: torch.compile is not supported on this Python/platform; training runs eagerly.")
        return model
    return torch.compile(model)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process on device, in MiB (process RSS peak on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
