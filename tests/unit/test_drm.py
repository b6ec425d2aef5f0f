"""GPUs NVML does not see (flows.gateways.drm), read from a sysfs and a proc tree the test builds as the kernel
lays them out: an AMD card read from its driver's files, an Intel one named with no reader, a virtual display
adapter and an NVIDIA card (NVML's) left out; the processes on each from their DRM file descriptors."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.gateways import drm
from tui.providers.fake_gpu import FakeHost
from tui.providers.telemetry import NvmlTelemetry

AMD_PCI, INTEL_PCI = "0000:03:00.0", "0000:00:02.0"
GIB = 1024**3


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def card(sys_root: Path, number: int, pci: str, vendor: str, driver: str, files: dict[str, str]) -> None:
    """/sys/class/drm/cardN -> its PCI device (a folder named by its address), with the driver's link and files."""
    device = sys_root / "devices" / "pci0000:00" / pci
    for name, text in {"vendor": vendor, "class": "0x030000", **files}.items():
        write(device / name, text)
    (sys_root / "bus" / "pci" / "drivers" / driver).mkdir(parents=True, exist_ok=True)
    (device / "driver").symlink_to(sys_root / "bus" / "pci" / "drivers" / driver)
    (sys_root / "class" / "drm" / f"card{number}").mkdir(parents=True)
    (sys_root / "class" / "drm" / f"card{number}" / "device").symlink_to(device)


@pytest.fixture
def sys_root(tmp_path) -> Path:
    root = tmp_path / "sys"
    card(root, 0, AMD_PCI, "0x1002", "amdgpu", {
        "device": "0x744c", "product_name": "AMD Radeon RX 7900 XTX", "gpu_busy_percent": "37",
        "mem_info_vram_used": str(4 * GIB), "mem_info_vram_total": str(24 * GIB),
        "hwmon/hwmon3/temp1_input": "54000", "hwmon/hwmon3/power1_average": "212000000",
        "hwmon/hwmon3/power1_cap": "327000000", "pp_dpm_sclk": "0: 500Mhz\n1: 2371Mhz *\n2: 2500Mhz",
        "pp_dpm_mclk": "0: 96Mhz\n3: 1249Mhz *"})
    (root / "class" / "drm" / "card0-DP-1").mkdir()  # a connector, not a card
    card(root, 1, INTEL_PCI, "0x8086", "i915", {"device": "0x56a0"})
    card(root, 2, "0000:00:05.0", "0x1af4", "virtio-pci", {})  # a VM's virtual display: no GPU
    card(root, 3, "0000:81:00.0", "0x10de", "nvidia", {})  # NVML's
    return root


@pytest.fixture
def proc_root(tmp_path) -> Path:
    root = tmp_path / "proc"
    for pid, fds in {"4242": {"5": "/dev/dri/renderD128", "6": "/dev/dri/card0"}, "4243": {"3": "/dev/dri/renderD129"},
                     "4244": {"1": "/dev/null"}, "4245": {"7": "socket:[123]"}}.items():
        (root / pid / "fd").mkdir(parents=True)
        for fd, target in fds.items():
            (root / pid / "fd" / fd).symlink_to(target)
    write(root / "4245" / "fdinfo" / "7", f"drm-driver:\tamdgpu\ndrm-pdev:\t{AMD_PCI}\ndrm-client-id:\t9")  # not a DRM fd
    amd = f"drm-driver:\tamdgpu\ndrm-pdev:\t{AMD_PCI}\ndrm-client-id:\t7\ndrm-memory-vram:\t1048576 KiB"
    write(root / "4242" / "fdinfo" / "5", amd)
    write(root / "4242" / "fdinfo" / "6", amd)  # the same client through a second descriptor: counted once
    write(root / "4243" / "fdinfo" / "3", f"drm-driver:\ti915\ndrm-pdev:\t{INTEL_PCI}\ndrm-client-id:\t2")
    write(root / "4244" / "fdinfo" / "1", "pos:\t0\nflags:\t02\nmnt_id:\t25")  # not a DRM descriptor
    return root


def test_amd_is_read_from_its_driver_intel_has_no_reader_and_the_rest_are_left_out(sys_root, proc_root):
    assert [(c.number, c.vendor, c.driver, c.pci) for c in drm.cards(sys_root)] == [
        (0, "AMD", "amdgpu", AMD_PCI), (1, "Intel", "i915", INTEL_PCI)]
    runs = {4242: "run-a"}
    amd, intel = drm.readings(2, sys_root, proc_root, joiner=runs.get)
    assert (amd.index, amd.name, amd.note) == (2, "AMD Radeon RX 7900 XTX (amdgpu)", None)
    assert (amd.util, amd.mem_used_mib, amd.mem_total_mib, amd.temp_c) == (37, 4096, 24576, 54)
    assert (amd.power_w, amd.power_limit_w, amd.sm_clock_mhz, amd.mem_clock_mhz) == (212, 327, 2371, 1249)
    assert amd.processes == [(4242, 1024, "run-a")]
    assert (intel.index, intel.name, intel.note) == (3, "Intel GPU 0x56a0 (i915)", drm.NO_READER)
    assert intel.util is None and intel.mem_used_mib is None and intel.processes == [(4243, None, None)]


def test_a_missing_file_is_none_and_no_drm_is_no_gpu(sys_root, tmp_path):
    (sys_root / "devices" / "pci0000:00" / AMD_PCI / "hwmon" / "hwmon3" / "power1_average").unlink()
    (sys_root / "devices" / "pci0000:00" / AMD_PCI / "gpu_busy_percent").write_text("garbage\n")
    amd = drm.readings(0, sys_root, tmp_path / "no-proc")[0]
    assert amd.util is None and amd.power_w is None and amd.temp_c == 54 and amd.processes == []
    assert drm.cards(tmp_path / "nothing") == [] and drm.readings(0, tmp_path / "nothing") == []


def test_without_nvml_an_amd_host_has_gpus_not_a_no_gpu_sentence(sys_root, tmp_path, monkeypatch):
    from flows.gateways import gpus

    monkeypatch.setattr(gpus, "load_nvml", lambda: (None, "No GPU: NVML is not available on this host; showing CPU only."))
    sample = NvmlTelemetry(host=FakeHost(), sys_root=sys_root, proc_root=tmp_path).sample()
    assert sample.no_gpu is None and [g.name for g in sample.gpus] == ["AMD Radeon RX 7900 XTX (amdgpu)",
                                                                      "Intel GPU 0x56a0 (i915)"]
