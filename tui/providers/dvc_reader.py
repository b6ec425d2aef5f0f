"""DVC's side: dvclive progress and curves (files), and the experiments table (``dvc exp show``)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from flows.contracts import metric_name
from flows.core.errors import TunedeckError
from flows.gateways.git import git
from tui.providers.models import Curves, Experiment, Progress, Registry, RegistryEvent

CURVES = ("train/loss", "val/loss", "val/acc")
PLOTS = "dvclive/plots/metrics"
UNKNOWN = "unknown"
"""A metric's value where a run could not measure it (flows.gateways.power: an energy counter it could not read)."""


def parse_tsv(text: str, metric: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(steps, values) of one dvclive TSV; the value column is the metric's last path part."""
    key = metric.rsplit("/", 1)[-1]
    rows = [r for r in csv.DictReader(text.splitlines(), delimiter="\t") if r.get(key)]
    return tuple(float(r["step"]) for r in rows), tuple(float(r[key]) for r in rows)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} → {'train.lr': 1}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def parse_exp_show(data: list[dict]) -> tuple[Experiment, ...]:
    """The rows of ``dvc exp show --json``: the workspace, each baseline commit, their experiments."""
    rows: list[Experiment] = []
    for base in data:
        rev = str(base.get("rev", "?"))
        rows.append(_row(base, base.get("name") or (rev if rev == "workspace" else rev[:7])))
        for exp in base.get("experiments") or ():
            for rev in exp.get("revs") or [exp]:
                rows.append(_row(rev, rev.get("name") or exp.get("name") or rev.get("rev", "?")[:7]))
    return tuple(rows)


def _row(entry: dict, name: str) -> Experiment:
    data = entry.get("data") or {}
    params: dict[str, Any] = {}
    for content in (data.get("params") or {}).values():
        params.update(flatten(content.get("data") or {}))
    metrics: dict[str, float | str] = {}
    for content in (data.get("metrics") or {}).values():  # "unknown": a counter a run could not read (energy.cpu_wh)
        metrics.update({k: v for k, v in flatten(content.get("data") or {}).items()
                        if isinstance(v, int | float) or v == UNKNOWN})
    rev = str(entry.get("rev", ""))
    return Experiment(name, "" if rev == "workspace" else rev[:7], tuple((k, str(v)) for k, v in params.items()),
                      tuple(sorted(metrics.items())))


class DvcReader:
    """Reads a project's dvclive and DVC state from disk (and ``dvc exp show`` in a subprocess)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path.cwd()

    def progress(self) -> Progress | None:
        """Step and latest metrics of dvclive/metrics.json, epochs from params.yaml."""
        path = self.root / "dvclive" / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
            updated = path.stat().st_mtime
        except (OSError, ValueError):
            return None
        epochs = None
        try:
            epochs = int(yaml.safe_load((self.root / "params.yaml").read_text())["train"]["epochs"])
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            pass
        flat = {metric_name(k): float(v) for k, v in flatten(metrics).items() if isinstance(v, int | float) and k != "step"}
        return Progress(int(metrics.get("step", 0)), epochs, tuple(sorted(flat.items())), updated)

    def curves(self) -> Curves:
        """dvclive's per-step TSVs for the headline curves."""
        series = []
        for name in CURVES:
            try:
                text = (self.root / PLOTS / f"{name}.tsv").read_text()
            except OSError:
                continue
            series.append((name, *parse_tsv(text, name)))
        return Curves(tuple(series))

    def curve_metrics(self, revs: list[str]) -> tuple[str, ...]:
        """The dvclive metrics (``val/acc`` ...) any of these experiments has; "" is the workspace."""
        names: set[str] = set()
        for rev in revs:
            if rev:
                names.update(p for p in self._git("ls-tree", "-r", "--name-only", rev, "--", PLOTS).splitlines())
            else:
                names.update(str(p.relative_to(self.root)) for p in (self.root / PLOTS).rglob("*.tsv"))
        return tuple(sorted(n[len(PLOTS) + 1:-4] for n in names if n.endswith(".tsv")))

    def experiment_curves(self, revs: list[str], metric: str) -> Curves:
        """One series per experiment (named by its rev): the dvclive TSV committed in its experiment commit."""
        series = []
        for rev in revs:
            path = f"{PLOTS}/{metric}.tsv"
            try:
                text = self._git("show", f"{rev}:{path}") if rev else (self.root / path).read_text()
            except (OSError, RuntimeError):
                continue  # this experiment did not log that metric
            series.append((rev, *parse_tsv(text, metric)))
        return Curves(tuple(series))

    def _git(self, *args: str) -> str:
        try:
            return git(*args, cwd=self.root, timeout=30)
        except TunedeckError as exc:
            raise RuntimeError(str(exc)) from None

    def registry(self) -> Registry:
        """The model registry of this clone (git tags; flows.ship.registry reads them)."""
        from flows.ship import registry

        prod = registry.prod(self.root)
        history = tuple(RegistryEvent(e.at.timestamp(), e.version, "-> prod" if e.event == "assignment" else "registered", e.message)
                        for e in registry.history(self.root)[:20])
        return Registry(prod.version if prod else None, tuple((v.version, v.commit) for v in registry.versions(self.root)), history)

    def experiments(self) -> tuple[Experiment, ...]:
        """``dvc exp show --json``; raises RuntimeError with one sentence when DVC fails."""
        dvc = Path(sys.executable).with_name("dvc")
        cmd = [str(dvc) if dvc.exists() else "dvc", "exp", "show", "--json"]
        proc = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "DVC_NO_ANALYTICS": "1"})
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"`dvc exp show` failed in {self.root}: {last[:200]}")
        return parse_exp_show(json.loads(proc.stdout or "[]"))
