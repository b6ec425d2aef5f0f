"""Every host's GPUs on one screen: a worker publishes its host's telemetry through the Prefect server.

``tunedeck worker`` runs a ``HostPublisher`` beside the Prefect worker. Every
TELEMETRY_EVERY_S seconds it samples this host (NVML through flows.gateways.gpus, psutil for CPU, RAM
and disk), joins each GPU process to its flow run, and posts the sample as one Prefect event
(``tunedeck.host.telemetry``, resource ``tunedeck.host.<host>``; flows.contracts.HostTelemetry
is its payload). A dashboard on any host reads the newest event of each host; one whose last
event is older than STALE_AFTER_S, or whose worker said it went offline, shows as stale.
Plain HTTP (Prefect's REST API, `POST /events`): no Prefect import in the worker's wrapper.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import httpx
import psutil

from flows.contracts import TELEMETRY_EVENT, TELEMETRY_EVERY_S, HostTelemetry
from flows.gateways import drm, gpus, prefect_api
from flows.run.runjoin import RunJoiner

GIB = 1024**3


def host_usage(disk_path: str) -> dict[str, float]:
    """This host's CPU (% since the last call), RAM and disk of disk_path's filesystem (psutil), in GiB."""
    mem, disk = psutil.virtual_memory(), psutil.disk_usage(disk_path)
    return {"cpu_percent": psutil.cpu_percent(interval=None), "cpu_count": psutil.cpu_count() or 1,
            "ram_used_gib": (mem.total - mem.available) / GIB, "ram_total_gib": mem.total / GIB,
            "disk_used_gib": disk.used / GIB, "disk_total_gib": disk.total / GIB}


class HostPublisher:
    """Samples this host and posts the sample to the Prefect server as an event, every `every` seconds."""

    def __init__(self, api_url: str, worker: str | None = None, every: float = TELEMETRY_EVERY_S,
                 project: Path | None = None, host_name: str = "") -> None:
        self.api_url = api_url.rstrip("/")
        self.worker, self.every = worker, every
        self.host = gpus.host(host_name)
        self.disk = str(project or Path.cwd())
        self.joiner = RunJoiner((project or Path.cwd()) / ".tunedeck" / "runs")
        self.http = prefect_api.rest(timeout=3.0)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="tunedeck-telemetry", daemon=True)
        self.sent = self.failed = 0
        psutil.cpu_percent(interval=None)

    def sample(self) -> HostTelemetry:
        """This host now: GPUs (NVIDIA's, then any other the kernel lists; each process joined to its flow run), CPU,
        RAM, disk."""
        nvml, no_gpu = gpus.load_nvml()
        readings = []
        for index in range(gpus.count(nvml) if nvml is not None else 0):
            readings.append(gpus.read_gpu(nvml, index, gpus.gpu_processes(nvml, index, self.joiner)))
        # stand-in GPUs (a test's) stand in for all the host's
        others = [] if getattr(nvml, "STAND_IN", False) else drm.readings(len(readings), joiner=self.joiner)
        return HostTelemetry(host=self.host, **host_usage(self.disk), gpus=readings + others,
                             no_gpu=None if others else no_gpu, worker=self.worker)

    def publish(self, sample: HostTelemetry, timeout: float | None = None) -> bool:
        """Post one sample as an event; False (and nothing raised) when the server does not take it."""
        event = prefect_api.event(TELEMETRY_EVENT, f"tunedeck.host.{sample.host}", sample.host,
                                  sample.model_dump(mode="json"), occurred=sample.at)
        try:
            prefect_api.post_events(self.http, self.api_url, [event], timeout)
            ok = True
        except httpx.HTTPError:
            ok = False
        self.sent += ok
        self.failed += not ok
        return ok

    def _loop(self) -> None:
        while not self.stopped.is_set():
            with contextlib.suppress(Exception):  # a sample that fails is skipped: telemetry never stops a worker
                self.publish(self.sample())
            self.stopped.wait(self.every)

    def start(self) -> HostPublisher:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and tell the dashboards this host is offline (its last event)."""
        self.stopped.set()
        self.thread.join(timeout=1.0)  # the worker's stop has a 10 s budget: never wait long on telemetry
        with contextlib.suppress(Exception):
            self.publish(self.sample().model_copy(update={"offline": True}), timeout=1.0)
