"""The one gateway to the GPUs NVML does not see: AMD and Intel devices, as the Linux kernel's DRM lists them.

NVML reads NVIDIA GPUs (flows.gateways.gpus). Every other GPU a host has is found in sysfs
(``/sys/class/drm/cardN``, a PCI display device of a known GPU vendor) and read by what its driver
reports there: the amdgpu driver publishes utilisation, VRAM, temperature, power and clocks (the same
files rocm-smi reads), so an AMD GPU shows all of them with no library installed. A device with no
such reader (Intel's i915 and xe publish no utilisation or memory use) is still listed, with its
name and NO_READER, never left out or blank. The processes using a device, and their VRAM, come
from each process's DRM file descriptors (``/proc/PID/fdinfo``: ``drm-pdev``, ``drm-memory-vram``),
as the kernel accounts them for every DRM driver since Linux 5.19.

Both roots are arguments: tests build a sysfs and a proc tree of their own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flows.contracts import GpuReading

SYS, PROC = Path("/sys"), Path("/proc")
NO_READER = "no reader for this device"
VENDORS = {"0x1002": "AMD", "0x8086": "Intel"}
"""GPU vendors read here by PCI id; NVIDIA (0x10de) is NVML's, and a virtual display adapter is no GPU."""
MIB = 1024**2
_KIB = {"": 1 / 1024, "KiB": 1, "MiB": 1024, "GiB": 1024**2}


@dataclass(frozen=True)
class Card:
    """One GPU as DRM lists it."""

    number: int
    device: Path
    vendor: str
    driver: str
    pci: str
    name: str


def cards(sys_root: Path = SYS) -> list[Card]:
    """The host's non-NVIDIA GPUs, in card order (connectors such as card0-DP-1 left out)."""
    found = []
    for path in sorted((sys_root / "class" / "drm").glob("card*"), key=lambda p: p.name):
        match = re.fullmatch(r"card(\d+)", path.name)
        device = path / "device"
        vendor = VENDORS.get(_text(device / "vendor") or "")
        if not match or vendor is None or not (_text(device / "class") or "").startswith("0x03"):
            continue
        driver = os.path.basename(os.readlink(device / "driver")) if (device / "driver").is_symlink() else "no driver"
        name = _text(device / "product_name") or f"{vendor} GPU {_text(device / 'device') or ''}".rstrip()
        found.append(Card(int(match.group(1)), device, vendor, driver, device.resolve().name, name))
    return found


def readings(first_index: int = 0, sys_root: Path = SYS, proc_root: Path = PROC,
             joiner: Callable[[int], str | None] | None = None) -> list[GpuReading]:
    """One reading per card, numbered from first_index (after NVML's GPUs); the processes on each, joined to their
    flow runs by joiner (none listed without one: the dashboard polls them less often)."""
    found = cards(sys_root)
    users = processes(found, proc_root, joiner) if joiner is not None else {}
    return [read(card, first_index + i, users.get(card.pci)) for i, card in enumerate(found)]


def processes(found: list[Card], proc_root: Path, joiner: Callable[[int], str | None]
              ) -> dict[str, list[tuple[int, float | None, str | None]]]:
    """PCI address -> (pid, VRAM MiB, flow run id) of each process using that card."""
    clients = drm_clients({card.pci for card in found}, proc_root) if found else {}
    return {pci: [(pid, mib, joiner(pid)) for pid, mib in used.items()] for pci, used in clients.items()}


def read(card: Card, index: int, processes: list[tuple[int, float | None, str | None]] | None = None) -> GpuReading:
    """What card's driver reports now; with no reader for its driver, its name and NO_READER alone."""
    name = f"{card.name} ({card.driver})"
    if card.driver != "amdgpu":
        return GpuReading(index=index, name=name, processes=processes or [], note=NO_READER)
    device, hwmon = card.device, next(iter(sorted((card.device / "hwmon").glob("hwmon*"))), None)
    sensor = (lambda file, scale: _number(hwmon / file, scale)) if hwmon else (lambda file, scale: None)
    power = sensor("power1_average", 1e-6)
    return GpuReading(
        index=index, name=name, util=_number(device / "gpu_busy_percent"),
        mem_used_mib=_number(device / "mem_info_vram_used", 1 / MIB), mem_total_mib=_number(device / "mem_info_vram_total", 1 / MIB),
        temp_c=sensor("temp1_input", 1e-3), power_w=power if power is not None else sensor("power1_input", 1e-6),
        power_limit_w=sensor("power1_cap", 1e-6), sm_clock_mhz=_clock(device / "pp_dpm_sclk"),
        mem_clock_mhz=_clock(device / "pp_dpm_mclk"), processes=processes or [])


def drm_clients(pcis: set[str], proc_root: Path = PROC) -> dict[str, dict[int, float | None]]:
    """PCI address -> {pid: VRAM MiB (None where its driver does not say)} of every other process with the device open.
    A DRM client open through several descriptors counts once. Only a descriptor that links to /dev/dri has its
    fdinfo read (one readlink per descriptor: a worker publishes this every few seconds)."""
    found: dict[str, dict[int, float | None]] = {}
    own = os.getpid()
    for fds in proc_root.glob("[0-9]*/fd"):
        pid, seen = int(fds.parent.name), set()
        if pid == own:
            continue
        try:
            entries = [fd.name for fd in fds.iterdir() if os.readlink(fd).startswith("/dev/dri/")]
        except OSError:  # gone, or not ours to read
            continue
        for entry in entries:
            fields = _fields(fds.parent / "fdinfo" / entry)
            pci, client = fields.get("drm-pdev"), fields.get("drm-client-id")
            if pci not in pcis or (pci, client) in seen:
                continue
            seen.add((pci, client))
            vram = _kib(fields.get("drm-memory-vram") or fields.get("drm-resident-vram0") or fields.get("drm-total-vram0"))
            used = found.setdefault(pci, {})
            used[pid] = (used.get(pid) or 0) + vram / 1024 if vram is not None else used.get(pid)
    return found


def _fields(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.splitlines()) if value}


def _kib(value: str | None) -> float | None:
    match = re.fullmatch(r"(\d+)\s*(\w*)", value or "")
    return int(match.group(1)) * _KIB[match.group(2)] if match and match.group(2) in _KIB else None


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _number(path: Path, scale: float = 1.0) -> float | None:
    try:
        return float(_text(path) or "") * scale
    except ValueError:
        return None


def _clock(path: Path) -> float | None:
    """The current level of an amdgpu clock table ("1: 1800Mhz *": the line marked with a star), in MHz."""
    for line in (_text(path) or "").splitlines():
        match = re.search(r"(\d+)\s*[Mm]hz\s*\*", line)
        if match:
            return float(match.group(1))
    return None
