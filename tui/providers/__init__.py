"""Data sources of the dashboard (Prefect, NVML/psutil, DVC, fakes, replay): plain dataclasses out, no Textual."""

from __future__ import annotations

from tui.providers.base import Providers


def demo_providers(runs: int = 1000, animate: bool = True) -> Providers:
    """Eight fake GPUs, a fake Prefect with ``runs`` runs, fake experiments: no GPU, no server needed."""
    from tui.providers.fake_dvc import FakeDvc
    from tui.providers.fake_gpu import FakeHost, FakeNvml, FakeRemoteHosts
    from tui.providers.fake_prefect import PIDS, FakePrefect
    from tui.providers.fleet import FleetTelemetry
    from tui.providers.telemetry import NvmlTelemetry

    owners = {pid: run_id for run_id, pids in PIDS.items() for pid in pids}
    telemetry = FleetTelemetry(NvmlTelemetry(FakeNvml(animate=animate), FakeHost(), owners.get), FakeRemoteHosts(animate))
    return Providers(telemetry, FakePrefect(runs), FakeDvc(), label="demo")


def live_providers() -> Providers:
    """NVML (or CPU only) and psutil, the project's Prefect server, DVC in the current directory."""
    from flows.gpus import host
    from flows.runjoin import RunJoiner
    from tui.providers.dvc_reader import DvcReader
    from tui.providers.fleet import FleetTelemetry, RemoteHosts
    from tui.providers.prefect_api import PrefectApi
    from tui.providers.telemetry import NvmlTelemetry

    api = PrefectApi()
    fleet = FleetTelemetry(NvmlTelemetry(joiner=RunJoiner()), RemoteHosts(lambda: api.url, local_host=host()))
    return Providers(fleet, api, DvcReader(), label="live")
