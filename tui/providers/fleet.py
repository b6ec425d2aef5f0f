"""Other hosts' GPUs, read from the Prefect server: the telemetry events their workers publish.

Each worker posts a ``tunedeck.host.telemetry`` event every few seconds (flows.host.telemetry). This
reads the newest one of each host (at most every ``every`` seconds: the events API is a
database query), keeps every host it has seen, and marks one stale when its worker said it
went offline or its newest sample is older than STALE_AFTER_S.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from flows.contracts import STALE_AFTER_S, TELEMETRY_EVENT, HostTelemetry
from tui.providers.base import TelemetrySource
from tui.providers.models import HostSample, RemoteHost, Telemetry
from tui.providers.telemetry import gpu_sample

WINDOW_S = 60.0  # how far back a fetch looks for a host's newest event
PAGES = 4  # at most this many pages of 50 events per fetch


class RemoteHosts:
    """The newest telemetry of every host that publishes it, through the Prefect events API."""

    def __init__(self, url: Callable[[], str | None], local_host: str | None = None, every: float = 2.0,
                 clock: Callable[[], float] = time.time, timeout: float = 3.0) -> None:
        self._url, self.local_host, self.every, self.clock = url, local_host, every, clock
        from flows.gateways.prefect_api import rest  # here, not at import: the demo's fleet (on fakes) needs no httpx

        self._http = rest(timeout=timeout)
        self.known: dict[str, HostTelemetry] = {}
        self._fetched_at: float | None = None

    def hosts(self) -> tuple[RemoteHost, ...]:
        """Every host seen so far, newest sample each, sorted by name; fetched at most every `every` s."""
        now = self.clock()
        if self._fetched_at is None or now - self._fetched_at >= self.every:
            self._fetched_at = now
            for sample in self._fetch(now):
                if sample.host != self.local_host and (sample.host not in self.known or sample.at >= self.known[sample.host].at):
                    self.known[sample.host] = sample
        return tuple(view(self.known[name], now) for name in sorted(self.known))

    def _fetch(self, now: float) -> list[HostTelemetry]:
        import httpx
        from pydantic import ValidationError

        url = self._url()
        if not url:
            return []
        since = datetime.fromtimestamp(now - WINDOW_S, tz=UTC)
        body = {"filter": {"occurred": {"since": since.isoformat(), "until": (since + timedelta(seconds=2 * WINDOW_S)).isoformat()},
                           "event": {"name": [TELEMETRY_EVENT]}, "order": "DESC"}, "limit": 50}
        found: list[HostTelemetry] = []
        try:
            page = self._http.post(f"{url.rstrip('/')}/events/filter", json=body)
            for _ in range(PAGES):
                if page.status_code >= 400:
                    break
                data = page.json()
                for event in data.get("events") or []:
                    try:
                        found.append(HostTelemetry.model_validate(event.get("payload") or {}))
                    except ValidationError:
                        continue  # another version's event: skip it
                if not data.get("next_page") or set(self.known) <= {s.host for s in found}:
                    break  # every host known has its newest sample
                page = self._http.get(data["next_page"])
        except (httpx.HTTPError, ValueError):
            return found  # the server is down: the hosts age into stale, the banner says why
        return found


def view(sample: HostTelemetry, now: float) -> RemoteHost:
    """A host's newest sample as the GPU panel draws it."""
    host = HostSample(sample.host, sample.cpu_percent, sample.cpu_count, sample.ram_used_gib, sample.ram_total_gib,
                      sample.disk_used_gib, sample.disk_total_gib)
    return RemoteHost(host, tuple(gpu_sample(g) for g in sample.gpus), max(0.0, now - sample.at),
                      sample.offline or now - sample.at > STALE_AFTER_S, sample.no_gpu, sample.worker)


class FleetTelemetry:
    """This host's telemetry (NVML, psutil) and every other host's, from the Prefect server."""

    def __init__(self, local: TelemetrySource, remote: RemoteHosts) -> None:
        self.local, self.remote = local, remote

    def sample(self) -> Telemetry:
        """This host now, with the other hosts' newest samples."""
        return replace(self.local.sample(), remote=self.remote.hosts())

    def __getattr__(self, name: str):
        return getattr(self.local, name)
