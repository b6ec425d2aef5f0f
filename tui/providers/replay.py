"""Record what the providers return (``--record FILE``) and play it back (``--replay FILE``).

A recording is JSON lines, ``{"kind": "telemetry" | "orchestration", "data": ...}``; a replay
cycles through them, filters runs in memory, and refuses actions (a replay is read-only).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flows.core.errors import TunedeckError
from tui.providers.base import ActionError, Providers
from tui.providers.fake_dvc import FakeDvc
from tui.providers.models import MonitorView, Orchestration, RunDetail, RunQuery, Telemetry, build


class Recorder:
    """Wraps a provider; every telemetry sample and snapshot is appended to a JSON-lines file."""

    def __init__(self, inner: Any, path: Path, kind: str) -> None:
        self.inner, self.path, self.kind = inner, path, kind

    @staticmethod
    def wrap(providers: Providers, path: Path) -> Providers:
        """Providers that record to path."""
        path.write_text("")
        return Providers(Recorder(providers.telemetry, path, "telemetry"), Recorder(providers.orchestrator, path, "orchestration"),
                         providers.experiments, label=f"{providers.label} · recording to {path}")

    def _write(self, value: Any) -> Any:
        with open(self.path, "a") as out:
            out.write(json.dumps({"kind": self.kind, "data": asdict(value)}, default=str) + "\n")
        return value

    def sample(self) -> Telemetry:
        """The inner sample, recorded."""
        return self._write(self.inner.sample())

    def snapshot(self, query: RunQuery) -> Orchestration:
        """The inner snapshot, recorded."""
        return self._write(self.inner.snapshot(query))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Replay:
    """Plays a recording back, one frame per call, looping."""

    def __init__(self, telemetry: list[Telemetry], snapshots: list[Orchestration]) -> None:
        self.telemetry, self.snapshots = telemetry, snapshots
        self._t = self._s = 0

    def sample(self) -> Telemetry:
        """The next recorded sample."""
        frame = self.telemetry[self._t % len(self.telemetry)]
        self._t += 1
        return frame

    def snapshot(self, query: RunQuery) -> Orchestration:
        """The next recorded snapshot, its runs filtered by query."""
        if not self.snapshots:
            return Orchestration(False, None, error="the recording has no Prefect snapshot")
        snap = self.snapshots[self._s % len(self.snapshots)]
        self._s += 1
        hits = [r for r in snap.runs if (not query.states or r.state in query.states) and query.text.lower() in r.name.lower()]
        return Orchestration(snap.connected, snap.url, tuple(hits[query.offset:query.offset + query.limit]), len(hits),
                             snap.deployments, snap.pools, snap.error, snap.running)

    def detail(self, run_id: str) -> RunDetail:
        """Logs are not recorded."""
        return RunDetail(("(a replay has no logs)",))

    def monitor(self) -> MonitorView:
        """A replay records no monitor batches."""
        return MonitorView(error="a replay has no monitor batches")

    def _refuse(self, *args: Any) -> str:
        raise ActionError("This is a replay: actions are off.")

    cancel = retry = set_paused = run_now = _refuse


def load_replay(path: Path) -> Providers:
    """Providers that replay path; a missing or empty file is one sentence."""
    telemetry, snapshots = [], []
    try:
        for line in path.read_text().splitlines():
            item = json.loads(line)
            target = telemetry if item["kind"] == "telemetry" else snapshots
            target.append(build(Telemetry if item["kind"] == "telemetry" else Orchestration, item["data"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TunedeckError(f"cannot replay {path}: {exc}; record one with `tunedeck dash --record {path}`.") from None
    if not telemetry:
        raise TunedeckError(f"{path} holds no telemetry to replay; record one with `tunedeck dash --record {path}`.")
    return Providers(Replay(telemetry, snapshots), Replay(telemetry, snapshots), FakeDvc(), label=f"replay of {path}")


