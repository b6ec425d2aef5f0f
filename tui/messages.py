"""Messages the dashboard's worker threads post upward: one dataclass each, stale samples replaceable."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from tui.providers.models import (
    Curves,
    Experiment,
    MonitorView,
    Orchestration,
    Progress,
    Registry,
    RunDetail,
    Telemetry,
)


@dataclass
class TelemetrySampled(Message):
    """A new GPU/host sample; an older one still queued is dropped."""

    telemetry: Telemetry

    def can_replace(self, message: Message) -> bool:
        """Only the newest sample matters."""
        return isinstance(message, TelemetrySampled)


@dataclass
class OrchestrationFetched(Message):
    """A new page of runs, the deployments and pools (or why the server could not be read)."""

    orchestration: Orchestration
    progress: Progress | None

    def can_replace(self, message: Message) -> bool:
        """Only the newest snapshot matters."""
        return isinstance(message, OrchestrationFetched)


@dataclass
class ActionFinished(Message):
    """An action (cancel, retry, pause, run now) is done: a sentence for the user, and whether it failed."""

    text: str
    failed: bool = False


@dataclass
class DetailFetched(Message):
    """Logs and artifacts of the run shown in the detail view."""

    detail: RunDetail

    def can_replace(self, message: Message) -> bool:
        """Only the newest log page matters."""
        return isinstance(message, DetailFetched)


@dataclass
class MonitorFetched(Message):
    """The drift monitor's batches and retrains (or the view's error)."""

    view: MonitorView


@dataclass
class ExperimentsFetched(Message):
    """The experiments table and curves, or one sentence saying why DVC could not give them."""

    experiments: tuple[Experiment, ...]
    curves: Curves
    error: str | None = None
    registry: Registry = Registry()
