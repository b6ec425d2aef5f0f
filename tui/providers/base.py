"""What the dashboard needs from its data sources; real, fake and replay providers implement these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tui.providers.models import (
    Curves,
    Experiment,
    MonitorView,
    Orchestration,
    Progress,
    Registry,
    RunDetail,
    RunQuery,
    Telemetry,
)


class ActionError(Exception):
    """An action the server refused or could not do; its text is one sentence for the user."""


class TelemetrySource(Protocol):
    """GPUs and host, sampled on demand (blocking; called from a worker thread)."""

    def sample(self) -> Telemetry:
        """One sample of the host and its GPUs, GPU processes joined to flow runs."""
        ...


class Orchestrator(Protocol):
    """The Prefect server: runs, deployments, pools, and the actions on them."""

    def snapshot(self, query: RunQuery) -> Orchestration:
        """A page of runs matching query, all deployments and pools; never raises."""
        ...

    def detail(self, run_id: str) -> RunDetail:
        """Log lines and artifacts of one run."""
        ...

    def cancel(self, run_id: str) -> str:
        """Cancel a run; returns a sentence saying what happened."""
        ...

    def retry(self, run_id: str) -> str:
        """Schedule a finished deployment run again."""
        ...

    def set_paused(self, deployment_id: str, paused: bool) -> str:
        """Pause or resume a deployment's schedule."""
        ...

    def monitor(self) -> MonitorView:
        """The drift monitor's last batches and the retrains they started."""
        ...

    def run_now(self, deployment_id: str, parameters: dict) -> str:
        """Create a flow run of a deployment now, with parameter overrides."""
        ...


class ExperimentSource(Protocol):
    """DVC: live training progress, experiments, training curves."""

    def progress(self) -> Progress | None:
        """The dvclive progress of the current training, if any."""
        ...

    def experiments(self) -> tuple[Experiment, ...]:
        """The experiments table (``dvc exp show``)."""
        ...

    def curves(self) -> Curves:
        """The training curves of the workspace."""
        ...

    def registry(self) -> Registry:
        """The model registry: prod, versions, history."""
        ...

    def curve_metrics(self, revs: list[str]) -> tuple[str, ...]:
        """The dvclive metrics any of these experiments has ("" is the workspace)."""
        ...

    def experiment_curves(self, revs: list[str], metric: str) -> Curves:
        """One series per experiment for one dvclive metric (overlaid in the experiments view)."""
        ...


@dataclass(frozen=True)
class Providers:
    """Everything the App is given: where telemetry, runs and experiments come from."""

    telemetry: TelemetrySource
    orchestrator: Orchestrator
    experiments: ExperimentSource
    label: str = "live"
