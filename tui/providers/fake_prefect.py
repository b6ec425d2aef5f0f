"""A fake Prefect server in memory: a seeded history of runs shaped like recorded real ones, three deployments, two pools."""

from __future__ import annotations

import random
from dataclasses import replace

from tui.providers.base import ActionError
from tui.providers.models import (
    Deployment,
    DriftPoint,
    MonitoredBatch,
    MonitorView,
    Orchestration,
    Progress,
    Retrain,
    Run,
    RunDetail,
    RunQuery,
    WorkPool,
)
from tui.providers.shapes import recorded, templates

NOW = 1_767_225_600.0  # 2026-01-01 00:00 UTC: fixed, so screens are the same on every run
ADJECTIVES = ("amber", "brisk", "calm", "dapper", "eager", "fuzzy", "gentle", "hardy", "icy", "jolly", "keen", "lucid")
ANIMALS = ("fox", "otter", "heron", "lynx", "moth", "newt", "orca", "panda", "quail", "raven", "stoat", "tapir")
PIDS = {"run-0000": (4101,), "run-0001": (4102,), "run-0002": (4103, 4104)}
LOCAL = "gpu-box-1"  # the demo's own host (tui.providers.fake_gpu.FakeHost)
ON_GPUS = {0: (LOCAL, (0,)), 1: (LOCAL, (1,)), 2: (LOCAL, (2, 3)), 3: ("gpu-box-2", (0,))}
"""Where the running runs train: three on this host (one DDP on two GPUs), one on another host."""
EPOCHS = 12


def fake_runs(count: int, seed: int = 7) -> list[Run]:
    """count runs, newest first, each built on a run recorded from a real server (tui/providers/recorded.json).

    Four pipeline deployment runs train (three on this host's GPUs, one on gpu-box-2), two wait
    scheduled, the rest are history: pipeline and experiment deployment runs, and the stage runs
    of plain `dvc repro`s.
    """
    rng = random.Random(seed)
    real = templates()
    runs = []
    for i in range(count):
        name = f"{rng.choice(ADJECTIVES)}-{rng.choice(ANIMALS)}-{i}"
        params = {"overrides": [f"train.lr={rng.choice((1e-3, 3e-4, 1e-4))}",
                                f"model.name={rng.choice(('resnet50', 'convnext_tiny', 'vit_small_patch16_224'))}"]}
        if i < 4:
            host, gpus = ON_GPUS[i]
            epoch = 8 if i == 0 else rng.randint(2, EPOCHS - 1)
            run = replace(real["pipeline:running"], host=host, gpus=gpus, parameters=params,
                          progress=_progress(real["pipeline:running"].progress, rng, epoch - 1, running=True))
            runs.append(_place(run, i, name, "RUNNING", NOW - 1800 - 120 * i, 1800.0 + 120 * i))
            continue
        if i < 6:
            run = replace(real["pipeline:running"], stage=None, progress=None, host=None, gpus=(), parameters=params)
            runs.append(_place(run, i, name, "SCHEDULED", None, None))
            continue
        state = rng.choices(("COMPLETED", "FAILED", "CRASHED", "CANCELLED"), (85, 8, 4, 3))[0]
        flow = rng.choice(("pipeline", "pipeline", "experiment", "prepare", "train", "evaluate"))
        template = real[f"{flow}:final"]
        run = replace(template, parameters=params if template.deployment else template.parameters,
                      tags=_tags(template.tags, rng, state), host=template.host and rng.choice((LOCAL, "gpu-box-2")))
        if run.progress is not None:
            run = replace(run, progress=_progress(run.progress, rng, EPOCHS - 1 if state == "COMPLETED" else rng.randint(0, 10)))
        if state != "COMPLETED" and flow in ("pipeline", "experiment"):
            stage = rng.choice(("prepare", "train", "evaluate"))
            run = replace(run, stage=stage, progress=None if stage == "prepare" else run.progress)
        runs.append(_place(run, i, name, state, NOW - 600 - 900 * i, rng.uniform(20, 3000)))
    return runs


def _place(run: Run, i: int, name: str, state: str, start: float | None, duration: float | None) -> Run:
    deployment_id = {"pipeline": "dep-pipeline", "train": "dep-train"}.get(run.deployment or "")
    return replace(run, id=f"run-{i:04d}", name=name, state=state, state_name=state.title(), start=start,
                   duration_s=duration, deployment_id=deployment_id)


def _tags(tags: tuple[str, ...], rng: random.Random, state: str) -> tuple[str, ...]:
    """The recorded run's tags with fresh versions; a run that did not complete has no model: tag."""
    out = []
    for tag in tags:
        kind, sep, _ = tag.partition(":")
        if kind == "model" and state != "COMPLETED":
            continue
        out.append(f"{kind}:{rng.getrandbits(48):012x}" if sep and kind in ("data", "model") else tag)
    return tuple(out)


def _progress(template: Progress, rng: random.Random, step: int, running: bool = False) -> Progress:
    """The recorded progress's metrics with plausible values at epoch step + 1 of EPOCHS."""
    done = (step + 1) / EPOCHS
    values = {"val/acc": 0.55 + 0.35 * done + rng.uniform(-0.03, 0.03), "val/loss": 1.4 - 0.9 * done,
              "train/loss": 1.3 - 1.0 * done, "samples_per_s": rng.uniform(900, 1400)}
    metrics = tuple((k, round(values.get(k, 0.0), 4)) for k, _ in template.metrics)
    eta = (EPOCHS - step - 1) * rng.uniform(60, 180) if running else template.eta_s
    return replace(template, step=step, epochs=EPOCHS, metrics=metrics, updated=NOW, eta_s=eta)


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

    def __init__(self, runs: int = 1000, connected: bool = True) -> None:
        self.runs = fake_runs(runs)
        self.deployments = fake_deployments()
        self.pools = [WorkPool("local", "READY", 2, 2), WorkPool("laptop", "NOT_READY", 0, 1)]
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
        """The log and summary of a real finished pipeline run, as recorded (tui/providers/recorded.json)."""
        found = recorded()["detail"]
        return RunDetail(tuple(found["logs"]), tuple(found["artifacts"]))

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
    """The shape flows.monitor records: statistics against the monitor params' default thresholds."""
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
        batches.append(MonitoredBatch(NOW - (11 - day) * 86400, f"data/incoming/2026-11-{day + 18:02d}", "v0.2.0", 400,
                                      drifted, streak, streak == 3, stats))
    retrain = Retrain("brave-lynx-1001", "Running", "drift: 400 images vs v0.2.0's reference: drift (mmd_p 0.002 (below 0.005), "
                      "domain_auc 0.93 (above 0.8)); 3 in a row; retrain event emitted", NOW - 300)
    return MonitorView(tuple(batches), (retrain,))
