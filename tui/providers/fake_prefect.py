"""A fake Prefect server in memory: a fixed, seeded history of runs, three deployments, two pools."""

from __future__ import annotations

import random
from dataclasses import replace

from tui.providers.base import ActionError
from tui.providers.models import Deployment, Orchestration, Run, RunDetail, RunQuery, WorkPool

NOW = 1_767_225_600.0  # 2026-01-01 00:00 UTC: fixed, so screens are the same on every run
ADJECTIVES = ("amber", "brisk", "calm", "dapper", "eager", "fuzzy", "gentle", "hardy", "icy", "jolly", "keen", "lucid")
ANIMALS = ("fox", "otter", "heron", "lynx", "moth", "newt", "orca", "panda", "quail", "raven", "stoat", "tapir")
PIDS = {"run-0000": (4101,), "run-0001": (4102,), "run-0002": (4103, 4104)}


def fake_runs(count: int, seed: int = 7) -> list[Run]:
    """count runs, newest first: three running (on GPUs), two scheduled, the rest a finished history."""
    rng = random.Random(seed)
    runs = []
    for i in range(count):
        state = ("RUNNING", "RUNNING", "RUNNING", "SCHEDULED", "SCHEDULED")[i] if i < 5 else rng.choices(
            ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), (85, 8, 4, 3))[0]
        flow = "train" if i < 3 else rng.choice(("prepare", "train", "evaluate", "pipeline"))
        start = None if state == "SCHEDULED" else NOW - 600 - 900 * i
        duration = (1800.0 + 120 * i) if state == "RUNNING" else None if start is None else rng.uniform(20, 3000)
        deployment = "pipeline/weekly-retrain" if i % 3 == 0 else None
        tags = ("tunedeck", f"data:{rng.getrandbits(32):08x}") + ((f"model:{rng.getrandbits(32):08x}",) if flow == "evaluate" else ())
        name = f"{rng.choice(ADJECTIVES)}-{rng.choice(ANIMALS)}-{i}"
        params = {"params": {"model": {"name": rng.choice(("resnet50", "convnext_tiny", "vit_small_patch16_224"))},
                             "train": {"lr": rng.choice((1e-3, 3e-4, 1e-4)), "epochs": 12}}}
        runs.append(Run(f"run-{i:04d}", name, flow, state, state.title(), start, duration, deployment,
                        "dep-weekly" if deployment else None, tags, params))
    return runs


def fake_deployments() -> list[Deployment]:
    """A weekly retrain, a paused nightly evaluation, an unscheduled ad-hoc training."""
    day = 86400.0
    return [
        Deployment("dep-weekly", "weekly-retrain", "pipeline", "cron 0 3 * * 1", False, (NOW + 2 * day, NOW + 9 * day),
                   "COMPLETED", "gpu-pool", ("overrides",)),
        Deployment("dep-nightly", "nightly-eval", "evaluate", "every 1d", True, (), "FAILED", "gpu-pool", ()),
        Deployment("dep-adhoc", "ad-hoc", "train", "none", False, (), None, "laptop", ("overrides",)),
    ]


class FakePrefect:
    """Implements the Orchestrator protocol in memory; actions change its state and are recorded."""

    def __init__(self, runs: int = 1000, connected: bool = True) -> None:
        self.runs = fake_runs(runs)
        self.deployments = fake_deployments()
        self.pools = [WorkPool("gpu-pool", "READY", 2, 2), WorkPool("laptop", "NOT_READY", 0, 1)]
        self.connected = connected
        self.actions: list[tuple[str, str]] = []
        self.url = "http://127.0.0.1:4200/api (demo)"

    def snapshot(self, query: RunQuery) -> Orchestration:
        """The runs matching query (substring of name, flow or deployment; state types), one page."""
        if not self.connected:
            return Orchestration(False, self.url, error=f"the Prefect server at {self.url} does not answer (ConnectError)")
        text = query.text.lower()
        hits = [r for r in self.runs if (not query.states or r.state in query.states)
                and (not text or text in f"{r.name} {r.flow} {r.deployment or ''}".lower())]
        page = tuple(hits[query.offset:query.offset + query.limit])
        running = tuple(r for r in self.runs if r.state == "RUNNING")
        return Orchestration(True, self.url, page, len(hits), tuple(self.deployments), tuple(self.pools), running=running)

    def detail(self, run_id: str) -> RunDetail:
        """A few log lines, like a training stage writes."""
        lines = tuple(f"00:{i // 60:02d}:{i % 60:02d} epoch {i}: train loss {1.9 / (i + 1):.3f}" for i in range(8))
        return RunDetail(("00:00:00 params resolved, device cuda:0", *lines), ("| accuracy | 0.866 |",))

    def _find(self, run_id: str) -> int:
        for i, run in enumerate(self.runs):
            if run.id == run_id:
                return i
        raise ActionError(f"Run {run_id} no longer exists on the server.")

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
        self.deployments = [replace(d, paused=paused) if d.id == deployment_id else d for d in self.deployments]
        return "Schedule paused." if paused else "Schedule resumed."

    def run_now(self, deployment_id: str, parameters: dict) -> str:
        """Adds a Scheduled run of the deployment at the top of the list."""
        dep = next(d for d in self.deployments if d.id == deployment_id)
        self.actions.append(("run", deployment_id))
        run = Run(f"run-new-{len(self.actions)}", f"manual-run-{len(self.actions)}", dep.flow, "SCHEDULED", "Scheduled",
                  None, None, f"{dep.flow}/{dep.name}", dep.id, ("tunedeck",), parameters)
        self.runs.insert(0, run)
        return f"Flow run {run.name} created."
