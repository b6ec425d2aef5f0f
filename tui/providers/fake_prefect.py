"""A fake Prefect server in memory: a seeded history of runs shaped like recorded real ones, three deployments, two pools."""

from __future__ import annotations

import random
from dataclasses import replace

from tui.providers.base import ActionError
from tui.providers.fake_runs import DEMO, NOW, Fleet, fake_runs
from tui.providers.models import (
    Deployment,
    DriftPoint,
    MonitoredBatch,
    MonitorView,
    Orchestration,
    Retrain,
    Run,
    RunDetail,
    RunQuery,
    WorkPool,
)
from tui.providers.shapes import recorded

__all__ = ["NOW", "PIDS", "FakePrefect", "fake_deployments", "fake_monitor", "fake_runs"]

PIDS = {"run-0000": (4101,), "run-0001": (4102,), "run-0002": (4103, 4104)}
"""The demo's processes on this host's GPUs (tui.providers.fake_gpu.FakeNvml), by the run they belong to."""


def fake_deployments() -> list[Deployment]:
    """The project's three deployments (prefect.yaml): the pipeline weekly (schedule off until resumed, as prefect.yaml
    ships it: Prefect then plans no run), ad-hoc experiments, the data watch (paused)."""
    return [
        Deployment("dep-pipeline", "pipeline", "pipeline", "cron 0 3 * * 1", False, (),
                   "COMPLETED", "local", ("overrides", "pull", "push"), schedule_active=False),
        Deployment("dep-train", "train", "experiment", "none", False, (), "FAILED", "local", ("overrides", "name")),
        Deployment("dep-watch", "data-watch", "data-watch", "every 10m", True, (), None, "laptop", ("stage",)),
    ]


class FakePrefect:
    """Implements the Orchestrator protocol in memory; actions change its state and are recorded."""

    def __init__(self, runs: int = 1000, connected: bool = True, layout: Fleet = DEMO) -> None:
        self.runs = fake_runs(runs, layout=layout)
        """Every run, newest first: made on demand, never all held (tui.providers.fake_runs)."""
        self.deployments = fake_deployments()
        self.pools = [WorkPool("local", "READY", 2, 2), WorkPool("laptop", "NOT_READY", 0, 1)]
        self.connected = connected
        self.actions: list[tuple[str, str]] = []
        self.url = "http://127.0.0.1:4200/api (demo)"
        self._hits: dict[tuple, list[int]] = {}
        """A filter's matching run positions, as a server's index would have them; cleared when runs change."""

    def snapshot(self, query: RunQuery) -> Orchestration:
        """The runs matching query (substring of name, flow or deployment; state types), one page."""
        if not self.connected:
            return Orchestration(False, self.url, error=f"the Prefect server at {self.url} does not answer (ConnectError)")
        running = tuple(self.runs.running())
        deps, pools = tuple(self.deployments), tuple(self.pools)
        if not query.text and not query.states:  # a page of everything costs only the page
            page = tuple(self.runs[query.offset:query.offset + query.limit])
            return Orchestration(True, self.url, page, len(self.runs), deps, pools, running=running)
        hits = self._matching(query.text.lower(), query.states)
        page = tuple(self.runs[i] for i in hits[query.offset:query.offset + query.limit])
        return Orchestration(True, self.url, page, len(hits), deps, pools, running=running)

    def _matching(self, text: str, states: tuple[str, ...]) -> list[int]:
        key = (text, states, len(self.runs))
        if key not in self._hits:
            self._hits = {key: [i for i, r in enumerate(self.runs) if (not states or r.state in states)
                                and (not text or text in f"{r.name} {r.flow} {r.deployment or ''}".lower())]}
        return self._hits[key]

    def detail(self, run_id: str) -> RunDetail:
        """The log and summary of a real finished pipeline run, as recorded (tui/providers/recorded.json)."""
        found = recorded()["detail"]
        return RunDetail(tuple(found["logs"]), tuple(found["artifacts"]))

    def _find(self, run_id: str) -> int:
        i = self.runs.index_of(run_id)
        if i < 0:
            raise ActionError(f"Run {run_id} no longer exists on the server.")
        self._hits = {}
        return i

    def cancel(self, run_id: str) -> str:
        """Marks the run Cancelled."""
        i = self._find(run_id)
        self.actions.append(("cancel", run_id))
        self.runs[i] = replace(self.runs[i], state="CANCELLED", state_name="Cancelled")
        return f"Run {self.runs[i].name} is cancelled."

    def retry(self, run_id: str) -> str:
        """Marks a deployment run Scheduled again."""
        i = self._find(run_id)
        if not self.runs[i].deployment_id:
            raise ActionError(f"Run {self.runs[i].name} has no deployment, so no worker can retry it: run `dvc repro` again.")
        self.actions.append(("retry", run_id))
        self.runs[i] = replace(self.runs[i], state="SCHEDULED", state_name="AwaitingRetry")
        return f"Run {self.runs[i].name} is scheduled to retry."

    def set_paused(self, deployment_id: str, paused: bool) -> str:
        """Flips the deployment's paused flag."""
        self.actions.append(("pause" if paused else "resume", deployment_id))
        self.deployments = [replace(d, paused=paused, schedule_active=d.schedule_active or not paused) if d.id == deployment_id
                            else d for d in self.deployments]
        return "Schedule paused." if paused else "Schedule resumed."

    def monitor(self) -> MonitorView:
        """Twelve daily batches: nine in distribution, then three blurred ones, the third starting a retrain."""
        return fake_monitor()

    def run_now(self, deployment_id: str, parameters: dict) -> str:
        """Adds a Scheduled run of the deployment at the top of the list."""
        dep = next(d for d in self.deployments if d.id == deployment_id)
        self.actions.append(("run", deployment_id))
        run = Run(f"run-new-{len(self.actions)}", f"manual-run-{len(self.actions)}", dep.flow, "SCHEDULED", "Scheduled",
                  None, None, dep.name, dep.id, (), parameters)
        self.runs.insert(0, run)
        return f"Flow run {run.name} created."


def fake_monitor() -> MonitorView:
    """The shape flows.ship.monitor records: statistics against the monitor params' default thresholds."""
    rng = random.Random(3)
    batches = []
    for day in range(12):
        shifted = day >= 9
        stats = (
            DriftPoint("mmd_p", 0.002 if shifted else round(rng.uniform(0.05, 0.9), 3), 0.005, shifted, "below"),
            DriftPoint("domain_auc", round(rng.uniform(0.9, 0.97) if shifted else rng.uniform(0.45, 0.6), 3), 0.8, shifted, "above"),
            DriftPoint("psi", round(rng.uniform(0.3, 0.5) if shifted else rng.uniform(0.01, 0.08), 3), 0.25, shifted, "above"),
            DriftPoint("chi2_p", round(rng.uniform(0.0, 0.004) if shifted else rng.uniform(0.1, 0.9), 3), 0.005, shifted, "below"),
            DriftPoint("confidence_drop", round(rng.uniform(0.12, 0.2) if shifted else rng.uniform(-0.02, 0.03), 3), 0.15,
                       False, "above"),
        )
        stats = tuple(DriftPoint(s.name, s.value, s.threshold, (s.value > s.threshold) if s.direction == "above"
                                 else (s.value < s.threshold), s.direction) for s in stats)
        drifted = any(s.flagged for s in stats)
        streak = day - 8 if shifted else 0
        guess = round(rng.uniform(0.58, 0.66) if shifted else rng.uniform(0.88, 0.93), 3)
        mix = (0.52, 0.12, 0.12, 0.12, 0.12) if shifted else (0.2, 0.21, 0.19, 0.2, 0.2)
        batches.append(MonitoredBatch(NOW - (11 - day) * 86400, f"data/incoming/2026-11-{day + 18:02d}", "v0.2.0", 400,
                                      drifted, streak, streak == 3, stats, (guess, guess - 0.045, guess + 0.045), 0.912,
                                      None, tuple(zip(("cat", "dog", "fox", "owl", "yak"), mix, strict=True))))
    retrain = Retrain("brave-lynx-1001", "Running", "drift: 400 images vs v0.2.0's reference: drift (mmd_p 0.002 (below 0.005), "
                      "domain_auc 0.93 (above 0.8)); 3 in a row; retrain event emitted", NOW - 300)
    return MonitorView(tuple(batches), (retrain,))
