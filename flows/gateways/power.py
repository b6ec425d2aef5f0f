"""The one gateway to energy counters: each GPU's total-energy counter (NVML, through flows.gateways.gpus) and the
CPU packages' RAPL counters (Linux powercap, /sys/class/powercap). A counter that cannot be read is None, shown as
"unknown", never as zero.

What a run's figures mean (docs/guide/cost.md says the same for a person):
- GPU energy: NVML's counter of the board's energy since the driver loaded (Volta and newer), read when training
  starts and ends, for the GPUs the run trained on only. It is the whole board's, so another process on the same
  GPU would count too (a run holds its GPU alone: flows.run.slot).
- CPU energy: the RAPL package counters (every package of the host: the cores, caches and memory controller, but
  not DRAM or the rest of the machine), so a run shares it with whatever else ran on the host meanwhile. Readable
  on bare-metal Intel and AMD (Zen) Linux hosts, usually by root only; in most VMs and containers it is absent.
- Device-hours: the training's wall time x the GPUs it held, or x its share of the CPU's threads on a CPU.
- Cost: device-hours x the host's price per device-hour (`tunedeck worker --price-per-hour`, or
  TUNEDECK_PRICE_PER_HOUR by hand); no price, no cost.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from flows.gateways import gpus

RAPL = Path("/sys/class/powercap")
UNKNOWN = "unknown"


def rapl_packages(root: Path = RAPL) -> list[Path]:
    """The RAPL package domains of this host (intel-rapl:N, named package-N); empty where there are none."""
    found = []
    for domain in sorted(root.glob("intel-rapl:*")) if root.is_dir() else []:
        try:
            if ":" not in domain.name.removeprefix("intel-rapl:") and (domain / "name").read_text().startswith("package"):
                found.append(domain)
        except OSError:
            continue
    return found


def read_rapl(domains: list[Path]) -> list[tuple[int, int]] | None:
    """Each package's (energy in uJ, the counter's range in uJ), or None if any cannot be read (no RAPL, or not
    root: recent kernels let only root read it)."""
    if not domains:
        return None
    try:
        return [(int((d / "energy_uj").read_text()), int((d / "max_energy_range_uj").read_text())) for d in domains]
    except (OSError, ValueError):
        return None


def gpu_energy_mj(nvml_indices: list[int]) -> dict[int, int | None]:
    """Each NVML GPU's total-energy counter in mJ (None where the device does not report one)."""
    nvml, _ = gpus.load_nvml()
    if nvml is None:
        return {i: None for i in nvml_indices}
    return {i: gpus.get(nvml.nvmlDeviceGetTotalEnergyConsumption, nvml.nvmlDeviceGetHandleByIndex(i)) for i in nvml_indices}


@dataclass(frozen=True)
class Energy:
    """What a run's training used: seconds, the devices it held, and the energy read from their counters."""

    seconds: float
    gpus: int
    """GPUs held (0: it trained on the CPU)"""
    cpu_share: float
    """its share of the host's CPU threads (a CPU run; 1.0 on a host it had alone)"""
    gpu_wh: float | None
    cpu_wh: float | None

    @property
    def device_hours(self) -> float:
        return self.seconds / 3600 * (self.gpus if self.gpus else self.cpu_share)

    def metrics(self, price_per_hour: float | None) -> dict[str, float | str]:
        """The run's figures as dvclive metrics (dvclive/metrics.json, so `dvc exp show` has them): a counter not read
        is "unknown"; no price, no cost."""
        out: dict[str, float | str] = {}
        if self.gpus:
            out["energy/gpu_wh"] = UNKNOWN if self.gpu_wh is None else round(self.gpu_wh, 4)
        out["energy/cpu_wh"] = UNKNOWN if self.cpu_wh is None else round(self.cpu_wh, 4)
        hours = out["cost/device_hours"] = round(self.device_hours, 6)
        if price_per_hour is not None:  # from the hours shown, so that a reader's own product agrees with it
            out["cost/price_per_hour"] = price_per_hour
            out["cost/total"] = round(hours * price_per_hour, 6)
        return out


class EnergyMeter:
    """Reads the counters at start and at stop(): the GPUs (NVML indices) a run may train on, and the CPU packages."""

    def __init__(self, nvml_indices: list[int], rapl_root: Path = RAPL) -> None:
        self.domains = rapl_packages(rapl_root)
        self.started = time.monotonic()
        self.gpu_start = gpu_energy_mj(nvml_indices)
        self.cpu_start = read_rapl(self.domains)

    @classmethod
    def for_host(cls, rapl_root: Path = RAPL) -> EnergyMeter:
        """A meter on every GPU of this host (which ones a run trains on is known at its end) and its CPU packages."""
        nvml, _ = gpus.load_nvml()
        return cls(list(range(gpus.count(nvml))) if nvml is not None else [], rapl_root)

    def stop(self, used: list[int] | None, held: int = 0, cpu_share: float = 1.0) -> Energy:
        """The energy since the start of the GPUs a run trained on (used: their NVML indices; empty on a CPU; None
        when one could not be named: unknown), held of them, and of the CPU packages."""
        seconds = time.monotonic() - self.started
        cpu_end = read_rapl(self.domains)
        cpu_wh = None
        if self.cpu_start is not None and cpu_end is not None:
            # a counter wraps at its range: at most once between two reads of a run shorter than that (hours)
            cpu_uj = sum((end - start) % span for (start, span), (end, _) in zip(self.cpu_start, cpu_end, strict=True))
            cpu_wh = cpu_uj / 3.6e9
        gpu_wh = None
        if used:
            gpu_end = gpu_energy_mj(used)
            deltas = [gpu_end[i] - self.gpu_start[i] for i in used  # type: ignore[operator]
                      if self.gpu_start.get(i) is not None and gpu_end.get(i) is not None]
            gpu_wh = sum(deltas) / 3.6e6 if len(deltas) == len(used) else None
        return Energy(seconds, held if used is None else max(held, len(used)), cpu_share, gpu_wh, cpu_wh)


def cpu_share() -> float:
    """This process's share of the host's CPU threads: its OMP_NUM_THREADS (a worker's CPU slot sets it) over the
    host's CPUs, else all of them."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    cores = os.cpu_count() or 1
    return min(1.0, int(threads) / cores) if threads.isdigit() and int(threads) > 0 else 1.0


def device_name(devices: list[str]) -> str:
    """What a run trained on, as a person names it: "cpu: AMD EPYC 7B13 (2 threads)", "cuda: NVIDIA H100 80GB HBM3",
    "rocm: AMD Instinct MI300X" (a ROCm build of torch names AMD GPUs cuda), "xpu: Intel(R) Data Center GPU Max 1550"
    (with several: "2 x ..."); a GPU library or a CPU model that cannot be read gives the kind alone."""
    if not devices or devices[0] in ("cpu", "mps"):
        kind = devices[0] if devices else "cpu"
        threads = os.environ.get("OMP_NUM_THREADS", "")
        threads = threads if threads.isdigit() else str(os.cpu_count() or 1)
        return f"{kind}: {cpu_model()} ({threads} threads)" if kind == "cpu" else kind
    kind = devices[0].split(":")[0]
    try:
        import torch

        from flows.core.devices import gpu_kind

        name = getattr(torch, kind).get_device_name(torch.device(devices[0]))
        kind = gpu_kind() if kind == "cuda" else kind
    except Exception:  # noqa: BLE001 - a name is a label; the figures stand without it
        name = kind
    return f"{kind}: {name}" if len(devices) == 1 else f"{kind}: {len(devices)} x {name}"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or "unknown CPU"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return "unknown CPU"
