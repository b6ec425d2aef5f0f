"""The GPU panel with GPUs NVML does not see: an AMD card's figures from its driver beside an NVIDIA one, and an
Intel card shown as having no reader (named, with the run on its slot), never a blank row."""

from __future__ import annotations

import pytest

from flows.gateways import drm
from flows.gateways.gpus import StandInNvml
from tests.tui.conftest import settle
from tests.unit.test_drm import proc_root, sys_root  # noqa: F401 - the sysfs and proc trees, as fixtures
from tui.providers.fake_gpu import FakeHost
from tui.providers.telemetry import NvmlTelemetry
from tui.widgets.gpu_panel import GpuPanel

pytestmark = pytest.mark.anyio


async def test_the_panel_shows_nvidia_then_amd_then_intel_saying_it_has_no_reader(providers, sys_root, proc_root):  # noqa: F811
    from tui.app import make_app
    from tui.providers.base import Providers

    running = providers.orchestrator.runs[0]
    telemetry = NvmlTelemetry(StandInNvml(1), FakeHost(), joiner={4242: running.id}.get, sys_root=sys_root,
                              proc_root=proc_root)
    sample = telemetry.sample()
    assert [(g.index, g.note) for g in sample.gpus] == [(0, None), (1, None), (2, drm.NO_READER)] and sample.no_gpu is None
    mixed = Providers(telemetry, providers.orchestrator, providers.experiments, label="mixed")
    app = make_app(providers=mixed, refresh_s=3600.0)
    async with app.run_test(size=(160, 42)) as pilot:
        await settle(pilot)
        panel = app.screen.query_one(GpuPanel)
        table = panel.query_one("#gpu-table")
        assert panel.border_title == "GPUs · 1 × stand-in GPU, 1 × AMD Radeon RX 7900 XTX (amdgpu), 1 × Intel GPU 0x56a0 (i915)"
        amd, intel = str(table.row("gpu1")), str(table.row("gpu2"))
        assert "37%" in amd and "4.0/24" in amd and "54°" in amd and "212/327" in amd and "2371/1249" in amd, amd
        assert f"{running.name} (" in amd and "4242:1024M" in amd, "the AMD GPU's process joined to its run"
        assert "no reader" in intel and "N/A" not in intel and intel.endswith(" 4243"), intel
        assert "GPU 2 Intel GPU 0x56a0 (i915): no reader for this device" in str(panel.query_one("#host-line").render())
