"""Data sources of the dashboard (Prefect, NVML/psutil, DVC, fakes, replay): plain dataclasses out, no Textual."""

from __future__ import annotations

from tui.providers.base import Providers


def demo_providers(runs: int = 1000, animate: bool = True, hosts: int = 0) -> Providers:
    """Eight fake GPUs, a fake Prefect with ``runs`` runs, fake experiments: no GPU, no server needed.

    hosts: a fleet instead of the demo's two other hosts, hosts × 8 GPUs in all (this host is
    one), six runs training on each host's first six GPUs (the bench: 8 hosts, 64 GPUs).
    """
    from tui.providers.fake_dvc import FakeDvc
    from tui.providers.fake_gpu import FakeHost, FakeNvml, FakeRemoteHosts
    from tui.providers.fake_prefect import PIDS, FakePrefect
    from tui.providers.fake_runs import DEMO, LOCAL, fleet, host_runs
    from tui.providers.fleet import FleetTelemetry
    from tui.providers.telemetry import NvmlTelemetry

    if not hosts:
        owners = {pid: run_id for run_id, pids in PIDS.items() for pid in pids}
        local = FakeNvml(animate=animate)
        layout = DEMO
    else:
        layout = fleet(hosts, 8, busy=6)
        on = host_runs(layout, LOCAL)
        owners = {4100 + gpu: run for gpu, run in on.items()}
        local = FakeNvml(8, {gpu: [(4100 + gpu, 61_000)] for gpu in on}, animate=animate)
    remote = FakeRemoteHosts(animate, layout if hosts else None, hosts)
    telemetry = FleetTelemetry(NvmlTelemetry(local, FakeHost(), owners.get), remote)
    prefect = FakePrefect(runs, layout=layout)
    return Providers(telemetry, prefect, FakeDvc(prefect.runs), label="demo")


def live_providers(host_name: str = "") -> Providers:
    """NVML (or CPU only) and psutil, the project's Prefect server, DVC in the current directory; host_name: the
    process's host setting (else the hostname)."""
    from flows.gateways.gpus import host
    from flows.run.runjoin import RunJoiner
    from tui.providers.dvc_reader import DvcReader
    from tui.providers.fleet import FleetTelemetry, RemoteHosts
    from tui.providers.prefect_api import PrefectApi
    from tui.providers.telemetry import NvmlTelemetry, PsutilHost

    api = PrefectApi()
    local = NvmlTelemetry(host=PsutilHost(host_name=host_name), joiner=RunJoiner())
    fleet = FleetTelemetry(local, RemoteHosts(lambda: api.url, local_host=host(host_name)))
    return Providers(fleet, api, DvcReader(), label="live")
