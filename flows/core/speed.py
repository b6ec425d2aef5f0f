"""Mixed precision, channels_last and torch.compile: resolved once, with a clear word when refused."""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flows.contracts.settings import variable
from flows.core.errors import TunedeckError

log = logging.getLogger("tunedeck")


FORCED = variable("cpu_bf16")
"""The setting that says whether this CPU has native bf16 (flows.contracts.settings), named in the reason it gives."""
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""The /proc/cpuinfo flags of x86 CPUs that compute bf16 natively (AVX512-BF16, AMX-BF16)."""


@dataclass(frozen=True)
class Precision:
    """The precision a run trains in, and why (recorded in the run's metrics)."""

    dtype: torch.dtype | None  # the autocast dtype; None: plain fp32
    reason: str

    @property
    def name(self) -> str:
        """bf16, fp16 or fp32."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")


def cpu_bf16(forced: bool | None = None) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and the evidence: forced (the process's setting), else /proc/cpuinfo's
    flags.

    torch.backends.cpu.get_cpu_capability() says AVX512 on CPUs with and without AVX512-BF16 (and
    oneDNN emulates bf16 on plain AVX512, slower than fp32), so the CPU's own flags decide.
    """
    if forced is not None:
        return forced, f"{FORCED}={int(forced)}"
    flags = cpu_flags()
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"the CPU has {'/'.join(found)}"
    return False, "the CPU has no avx512_bf16/amx_bf16" if flags else "the CPU's flags are unknown (no /proc/cpuinfo)"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((row for row in text.splitlines() if row.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def resolve_precision(precision: str, device: torch.device, cpu_bf16_forced: bool | None = None) -> Precision:
    """The autocast dtype for train.precision on device, with the reason; refuse what the device cannot do.
    cpu_bf16_forced: the process's setting of whether the CPU has native bf16 (None: its flags say)."""
    if precision == "fp32":
        return Precision(None, "train.precision is fp32")
    if precision == "auto":
        if device.type == "cuda":
            if torch.cuda.is_bf16_supported():
                return Precision(torch.bfloat16, f"auto: {torch.cuda.get_device_name(device)} supports bf16")
            return Precision(torch.float16, f"auto: {torch.cuda.get_device_name(device)} lacks bf16")
        if device.type == "cpu":
            native, why = cpu_bf16(cpu_bf16_forced)
            return Precision(torch.bfloat16 if native else None, f"auto: {why}")
        if device.type == "xpu":  # Intel's data-centre and Arc GPUs compute bf16 natively
            return Precision(torch.bfloat16, f"auto: {torch.xpu.get_device_name(device)} (xpu) supports bf16")
        return Precision(None, f"auto: fp32 on {device.type}")
    if precision == "fp16":
        if device.type == "cpu":
            raise TunedeckError("train.precision fp16 needs a CUDA or MPS device: use bf16, fp32 or auto on the CPU.")
        return Precision(torch.float16, "train.precision is fp16")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TunedeckError(
            f"train.precision bf16 is not supported by {torch.cuda.get_device_name(device)}: use fp16 or auto."
        )
    if device.type == "mps":
        try:
            torch.zeros(1, dtype=torch.bfloat16, device=device)
        except (RuntimeError, TypeError):
            raise TunedeckError("train.precision bf16 is not supported by this MPS device: use fp16 or auto.") from None
    return Precision(torch.bfloat16, "train.precision is bf16")


def autocast_dtype(precision: str, device: torch.device, cpu_bf16_forced: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for train.precision on device (None: plain fp32)."""
    return resolve_precision(precision, device, cpu_bf16_forced).dtype


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
    if device.type in ("cuda", "xpu"):
        return getattr(torch, device.type).max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


FUSED_OPTIMIZERS = ("Adam", "AdamW", "SGD", "Adagrad")
"""torch's optimizers with a fused kernel (one kernel over every parameter) on the CPU and CUDA."""


def fused_option(opt: str, device: torch.device) -> dict[str, bool]:
    """{"fused": True} when timm's optimizer named opt is a torch one with a fused kernel on this device, else {}.

    On this 2-core CPU the fused AdamW step of resnet18 takes 12 ms against 33 ms for the
    default (foreach) step, 1.2x on a whole bf16 training step at 64 px; the numbers it computes
    are the same updates, rounded the same to within fp32 noise.
    """
    if device.type not in ("cpu", "cuda"):
        return {}
    from timm.optim import get_optimizer_class

    try:
        cls = get_optimizer_class(opt, bind_defaults=False)
    except ValueError:  # lookahead_* and unknown names: timm's own factory decides
        return {}
    return {"fused": True} if cls.__module__.startswith("torch.optim") and cls.__name__ in FUSED_OPTIMIZERS else {}


def retain_freed_memory() -> bool:
    """Keep the memory a training step frees in the process's heap for the next step (glibc only).

    glibc returns freed blocks to the kernel (munmap above the mmap threshold, trim of the heap's
    top), and the next step faults every page back in zeroed: about 6,500 page faults a step for
    resnet18 at 64 px, batch 32, on the CPU. With a 32 MiB mmap threshold and a 1 GiB trim
    threshold a training process keeps them: no faults after the first step, and its peak memory is
    the same (what it keeps is what it will use again). False where the C library is not glibc.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


SMALL_MAP = 16
"""Convolutions whose output map has at most this many pixels (4 x 4) run in NCHW on the CPU."""


def nchw_for_small_maps(model: nn.Module, image_size: int) -> int:
    """On the CPU, run the convolutions of a channels_last model whose output map is at most 4 x 4 in NCHW.

    oneDNN's channels_last convolutions are the faster ones on large maps and the slower ones on
    the smallest: forward + backward of a 3x3 bf16 convolution, batch 32, on this 2-core CPU, NCHW
    against channels_last: 512 channels at 2x2 1.24x, at 4x4 1.19x; 256 at 4x4 1.14x; but 256 at
    7x7 0.95x and 128 at 8x8 0.88x. At 64 px that is resnet18's last two stages: its whole step,
    1.03-1.07x. One probe forward pass at image_size finds each convolution's map; those at most
    SMALL_MAP pixels get NCHW weights and an NCHW input (a no-op after the first). Shapes alone
    decide, so a run is as reproducible as before. Returns how many convolutions it moved.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return 0
    maps: dict[nn.Module, int] = {}
    hooks = [c.register_forward_hook(lambda mod, _args, out: maps.__setitem__(mod, out.shape[-2] * out.shape[-1])) for c in convs]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, convs[0].in_channels, image_size, image_size).contiguous(memory_format=torch.channels_last))
    except Exception as exc:  # noqa: BLE001 - a model the probe cannot run keeps channels_last everywhere
        log.debug("no NCHW for small maps: the probe pass failed (%s)", exc)
        return 0
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    small = [c for c in convs if maps.get(c, SMALL_MAP + 1) <= SMALL_MAP]
    for conv in small:
        conv.to(memory_format=torch.contiguous_format)
        conv.register_forward_pre_hook(lambda _mod, args: (args[0].contiguous(), *args[1:]))
    return len(small)
