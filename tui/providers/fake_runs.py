"""The fake Prefect server's run history: any number of runs, each built on demand from its index.

A team's server keeps tens of thousands of runs; the fake keeps none of them. Run i is made
from a random stream seeded by i alone (so any page costs only its own runs), on a run
recorded from a real server (tui/providers/recorded.json). Runs the user changed (cancel,
retry) or created (run now) are kept, and only those.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from tui.providers.models import Progress, Run
from tui.providers.shapes import templates

NOW = 1_767_225_600.0  # 2026-01-01 00:00 UTC: fixed, so screens are the same on every run
ADJECTIVES = ("amber", "brisk", "calm", "dapper", "eager", "fuzzy", "gentle", "hardy", "icy", "jolly", "keen", "lucid")
ANIMALS = ("fox", "otter", "heron", "lynx", "moth", "newt", "orca", "panda", "quail", "raven", "stoat", "tapir")
LOCAL = "gpu-box-1"  # the demo's own host (tui.providers.fake_gpu.FakeHost)
EPOCHS = 12
SCHEDULED = 2  # scheduled runs right after the running ones
KEEP = 500
"""Runs made lately that the fake keeps (a few pages, as a server's cache would): polling a page makes no new ones."""


@dataclass(frozen=True)
class Fleet:
    """Where the running runs train: (host, GPUs) of each, in run order, and the pid of each run's process."""

    placements: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def running(self) -> int:
        """How many runs train now (runs 0 .. running - 1)."""
        return len(self.placements)


DEMO = Fleet(((LOCAL, (0,)), (LOCAL, (1,)), (LOCAL, (2, 3)), ("gpu-box-2", (0,))))
"""The demo: three runs on this host (one DDP on two GPUs), one on gpu-box-2."""


def fleet(hosts: int, gpus: int, busy: int) -> Fleet:
    """hosts × gpus GPUs (gpu-box-1 is this host), busy GPUs of each host holding one training run each."""
    return Fleet(tuple((f"gpu-box-{h + 1}", (g,)) for h in range(hosts) for g in range(busy)))


def host_runs(layout: Fleet, host: str) -> dict[int, str]:
    """GPU index → the id of the run training on it, on one host."""
    return {gpu: run_id(i) for i, (where, gpus) in enumerate(layout.placements) if where == host for gpu in gpus}


def run_id(i: int) -> str:
    """The fake server's id of run i."""
    return f"run-{i:04d}"


def make_run(i: int, layout: Fleet = DEMO, seed: int = 7) -> Run:
    """Run i (0 is the newest): layout.running runs train, SCHEDULED wait, the rest are history of every kind."""
    rng = random.Random(seed * 1_000_003 + i)
    real = templates()
    name = f"{rng.choice(ADJECTIVES)}-{rng.choice(ANIMALS)}-{i}"
    params = {"overrides": [f"train.lr={rng.choice((1e-3, 3e-4, 1e-4))}",
                            f"model.name={rng.choice(('resnet50', 'convnext_tiny', 'vit_small_patch16_224'))}"]}
    if i < layout.running:
        host, gpus = layout.placements[i]
        epoch = 8 if i == 0 else rng.randint(2, EPOCHS - 1)
        run = replace(real["pipeline:running"], host=host, gpus=gpus, parameters=params,
                      progress=_progress(real["pipeline:running"].progress, rng, epoch - 1, running=True))
        return _place(run, i, name, "RUNNING", NOW - 1800 - 120 * i, 1800.0 + 120 * i)
    if i < layout.running + SCHEDULED:
        run = replace(real["pipeline:running"], stage=None, progress=None, host=None, gpus=(), parameters=params)
        return _place(run, i, name, "SCHEDULED", None, None)
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
    run = replace(run, scores=_scores(run, rng) if state == "COMPLETED" else (),
                  cost=_cost(run, rng) if state == "COMPLETED" else ())
    return _place(run, i, name, state, NOW - 600 - 900 * i, rng.uniform(20, 3000))


def _place(run: Run, i: int, name: str, state: str, start: float | None, duration: float | None) -> Run:
    deployment_id = {"pipeline": "dep-pipeline", "train": "dep-train"}.get(run.deployment or "")
    return replace(run, id=run_id(i), name=name, state=state, state_name=state.title(), start=start,
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


def _scores(run: Run, rng: random.Random) -> tuple[tuple[str, float], ...]:
    """The recorded run's final scores (test/acc, test/macro_f1) with values near its val/acc."""
    val = dict(run.progress.metrics).get("val/acc") if run.progress else None
    acc = (val if val is not None else rng.uniform(0.8, 0.9)) - rng.uniform(0.0, 0.03)
    values = {"test/acc": acc, "test/macro_f1": acc - rng.uniform(0.002, 0.02)}
    return tuple((k, round(values.get(k, acc), 4)) for k, _ in run.scores)


def _cost(run: Run, rng: random.Random) -> tuple[tuple[str, float | str], ...]:
    """The recorded run's energy and cost figures, scaled by one random training length; "unknown" stays so."""
    scale = rng.uniform(0.3, 3.0)
    return tuple((k, v if isinstance(v, str) or k == "cost/price_per_hour" else round(v * scale, 6)) for k, v in run.cost)


class FakeRuns(Sequence[Run]):
    """count runs, newest first, made when asked for; runs created since come first, changed runs are kept."""

    def __init__(self, count: int, layout: Fleet = DEMO, seed: int = 7) -> None:
        self.count, self.layout, self.seed = count, layout, seed
        self.added: list[Run] = []
        """Runs created through the fake (run now), newest first."""
        self.changed: dict[int, Run] = {}
        """Generated runs the user changed (cancelled, retried), by index."""
        self._made: OrderedDict[int, Run] = OrderedDict()
        """The last KEEP runs made, by index."""

    def __len__(self) -> int:
        return len(self.added) + self.count

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i < len(self.added):
            return self.added[i]
        base = i - len(self.added)
        return self.changed.get(base) or self._make(base)

    def _make(self, i: int) -> Run:
        run = self._made.get(i)
        if run is None:
            run = self._made[i] = make_run(i, self.layout, self.seed)
            if len(self._made) > KEEP:
                self._made.popitem(last=False)
        else:
            self._made.move_to_end(i)
        return run

    def __setitem__(self, i: int, run: Run) -> None:
        if i < len(self.added):
            self.added[i] = run
        else:
            self.changed[i - len(self.added)] = run

    def __iter__(self) -> Iterator[Run]:
        return (self[i] for i in range(len(self)))

    def insert(self, i: int, run: Run) -> None:
        """A new run (only at the top: the newest)."""
        self.added.insert(min(i, len(self.added)), run)

    def running(self) -> list[Run]:
        """The runs that may be running: the generated trainings and any created or changed run, checked."""
        near = [*self.added, *(self[len(self.added) + i] for i in range(min(self.layout.running, self.count))),
                *self.changed.values()]
        return list({r.id: r for r in near if r.state == "RUNNING"}.values())

    def index_of(self, run_id: str) -> int:
        """Where run_id is in the list, or -1."""
        for i, run in enumerate(self.added):
            if run.id == run_id:
                return i
        if run_id.startswith("run-") and run_id[4:].isdigit() and int(run_id[4:]) < self.count:
            return len(self.added) + int(run_id[4:])
        return -1


def fake_runs(count: int, seed: int = 7, layout: Fleet = DEMO) -> FakeRuns:
    """count runs, newest first, each built on a run recorded from a real server (tui/providers/recorded.json).

    layout.running pipeline deployment runs train (the demo: three on this host's GPUs, one on
    gpu-box-2), two wait scheduled, the rest are history: pipeline and experiment deployment
    runs, and the stage runs of plain `dvc repro`s.
    """
    return FakeRuns(count, layout, seed)
