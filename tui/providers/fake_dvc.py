"""Fixed experiments, progress and curves, for --demo and tests."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from tui.providers.fake_prefect import NOW
from tui.providers.models import Curves, Experiment, Progress, Registry, RegistryEvent, Run

MADE_BY_RUNS = 2
"""How many of the fake server's newest finished deployment runs have their experiment here."""


class FakeDvc:
    """A training at epoch 8 of 12, five experiments (and those the fake server's newest finished runs saved), smooth curves."""

    def __init__(self, runs: Sequence[Run] = ()) -> None:
        self.made = _made_by(runs)
        """The experiments deployment runs saved, named after them (flows.run.pipeline.save_experiment)."""

    def progress(self) -> Progress:
        """Epoch 7 (0-based) of 12, with the latest validation metrics."""
        return Progress(7, 12, (("train/loss", 0.212), ("val/acc", 0.874), ("val/loss", 0.433)), NOW)

    def experiments(self) -> tuple[Experiment, ...]:
        """The workspace, main, and three experiments varying lr and the backbone."""
        rows = [("workspace", "", "resnet18", "0.001", 0.866), ("main", "2ca95a1", "resnet18", "0.001", 0.866),
                ("demo-scratch", "a41f09c", "resnet18", "0.001", 0.674), ("lr-3e-4", "c7d2e11", "resnet50", "0.0003", 0.902),
                ("convnext", "9e0b5a3", "convnext_tiny", "0.0003", 0.915)]
        return tuple(Experiment(name, rev, (("model.name", model), ("train.lr", lr), ("train.epochs", "12")),
                                (("accuracy", acc), ("macro_f1", round(acc - 0.004, 3))))
                     for name, rev, model, lr, acc in rows) + self.made

    def registry(self) -> Registry:
        """Two versions; the second was promoted, then rolled back to the first."""
        return Registry("v0.1.0", (("v0.2.0", "c7d2e11" + "0" * 33), ("v0.1.0", "2ca95a1" + "0" * 33)), (
            RegistryEvent(NOW - 600, "v0.1.0", "-> prod", "rollback from v0.2.0 to v0.1.0"),
            RegistryEvent(NOW - 7200, "v0.2.0", "-> prod", "promoted: test accuracy 0.9020 against prod's 0.8660"),
            RegistryEvent(NOW - 7200, "v0.2.0", "registered", "promoted: test accuracy 0.9020 against prod's 0.8660"),
            RegistryEvent(NOW - 86400, "v0.1.0", "-> prod", "promoted: there is no prod model yet."),
        ))

    def curves(self) -> Curves:
        """Twelve epochs of falling loss and rising accuracy."""
        steps = tuple(float(i) for i in range(12))
        return Curves((
            ("train/loss", steps, tuple(1.9 * math.exp(-i / 3) + 0.08 for i in range(12))),
            ("val/loss", steps, tuple(1.7 * math.exp(-i / 3.5) + 0.4 for i in range(12))),
            ("val/acc", steps, tuple(0.9 - 0.7 * math.exp(-i / 3) for i in range(12))),
        ))

    def curve_metrics(self, revs: list[str]) -> tuple[str, ...]:
        """The three headline dvclive metrics, for any experiment."""
        return ("train/loss", "val/acc", "val/loss")

    def experiment_curves(self, revs: list[str], metric: str) -> Curves:
        """Each experiment's curve ends near its final accuracy (the fakes' only difference)."""
        finals = {e.rev: dict(e.metrics).get("accuracy", 0.8) for e in self.experiments()}
        steps = tuple(float(i) for i in range(12))
        series = []
        for rev in revs:
            final = finals.get(rev, 0.8)
            if metric == "val/acc":
                values = tuple(0.1 + (final - 0.1) * (1 - math.exp(-i / 3)) for i in range(12))
            else:
                values = tuple((2.0 - final) * math.exp(-i / 3) + 0.3 * (1 - final) for i in range(12))
            series.append((rev, steps, values))
        return Curves(tuple(series))


def _made_by(runs: Sequence[Run]) -> tuple[Experiment, ...]:
    """The experiments the newest completed pipeline runs saved: their overrides as params, their test scores as metrics."""
    made = []
    for run in runs[:40]:
        if run.flow == "pipeline" and run.state == "COMPLETED" and run.scores and len(made) < MADE_BY_RUNS:
            overrides = dict(o.split("=", 1) for o in run.parameters.get("overrides") or () if "=" in o)
            params = (("model.name", overrides.get("model.name", "resnet18")), ("train.lr", overrides.get("train.lr", "0.001")),
                      ("train.epochs", "12"))
            scores = dict(run.scores)
            metrics = (("accuracy", scores["test/acc"]), ("macro_f1", scores["test/macro_f1"]))
            made.append(Experiment(run.name, hashlib.sha1(run.id.encode()).hexdigest()[:7], params, metrics))
    return tuple(made)
