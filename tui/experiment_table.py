"""Pure helpers for the experiments view: which columns (metrics, then changed params), sorted rows, the diff of two."""

from __future__ import annotations

from dataclasses import replace

from tui.providers.models import Experiment, Run

MAX_PARAMS = 6


def table_columns(experiments: tuple[Experiment, ...]) -> list[str]:
    """The older params-first order: params that vary (at most MAX_PARAMS), then every metric. The view uses columns()."""
    return changed_params(experiments)[:MAX_PARAMS] + metric_keys(experiments)


def columns(experiments: tuple[Experiment, ...], all_params: bool = False) -> list[str]:
    """Every metric first, then params: only those that differ between rows (``--only-changed``) unless all_params.

    Saved experiments decide the columns; a running one (its overrides only) shows in them.
    """
    experiments = tuple(e for e in experiments if not e.running)
    return metric_keys(experiments) + (param_keys(experiments) if all_params else changed_params(experiments))


def metric_keys(experiments: tuple[Experiment, ...]) -> list[str]:
    """Every metric any row has, sorted."""
    return sorted({k for e in experiments for k, _ in e.metrics})


def param_keys(experiments: tuple[Experiment, ...]) -> list[str]:
    """Every param any row has, in the order DVC lists them."""
    return list(dict.fromkeys(k for e in experiments for k, _ in e.params))


def changed_params(experiments: tuple[Experiment, ...]) -> list[str]:
    """Params whose value differs between rows (a row without the param counts as a different value)."""
    rows = [dict(e.params) for e in experiments]
    return [k for k in param_keys(experiments) if len({row.get(k) for row in rows}) > 1]


def _cell(e: Experiment, column: str) -> str | float | None:
    metrics = dict(e.metrics)
    return metrics[column] if column in metrics else dict(e.params).get(column)


def table_rows(experiments: tuple[Experiment, ...], columns: list[str], sort: str | None = None,
               reverse: bool = False) -> list[tuple[int, list[str]]]:
    """(index into experiments, cells) per experiment, sorted by a column (missing values last, either way)."""
    rows = list(range(len(experiments)))
    if sort in ("experiment", "rev") or sort in columns:
        def value(i: int):
            e = experiments[i]
            return e.name if sort == "experiment" else e.rev if sort == "rev" else _cell(e, sort)
        present = sorted((i for i in rows if value(i) is not None), key=lambda i: _as_number(value(i)), reverse=reverse)
        rows = present + [i for i in rows if value(i) is None]
    return [(i, [experiments[i].name, experiments[i].rev, *[_fmt(_cell(experiments[i], c)) for c in columns]]) for i in rows]


def _as_number(value):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def diff(a: Experiment, b: Experiment) -> list[tuple[str, str, str]]:
    """(key, value in a, value in b) for every param or metric that differs."""
    rows = []
    for kind_a, kind_b in ((dict(a.params), dict(b.params)), (dict(a.metrics), dict(b.metrics))):
        for key in sorted(kind_a.keys() | kind_b.keys()):
            if kind_a.get(key) != kind_b.get(key):
                rows.append((key, _fmt(kind_a.get(key)), _fmt(kind_b.get(key))))
    return rows


def pick_metric(available: tuple[str, ...], wanted: str | None) -> str | None:
    """The metric to overlay: the one asked for if the experiments have it, else val/acc, else the first."""
    if wanted in available:
        return wanted
    return "val/acc" if "val/acc" in available else (available[0] if available else None)


EXPERIMENT_FLOWS = ("pipeline", "experiment")
"""The flows whose run ends as a DVC experiment named after it (flows.run.pipeline.save_experiment)."""


def experiment_name(run: Run) -> str | None:
    """The DVC experiment a run makes: an experiment run's ``name`` parameter, else the run's name; None for a stage run."""
    if run.flow not in EXPERIMENT_FLOWS:
        return None
    return str(run.parameters.get("name") or run.name)


def run_status(run: Run) -> str:
    """What a running run does, in a few words: its stage and epoch ("train 8/12")."""
    progress = run.progress
    epoch = f" {progress.step + 1}/{progress.epochs}" if progress and progress.epochs and run.stage == "train" else ""
    return f"{run.stage or run.state.lower()}{epoch}"


def with_running(experiments: tuple[Experiment, ...], running: tuple[Run, ...]) -> tuple[Experiment, ...]:
    """The experiments, each one a running run is making marked; one not saved yet added at the end, with its overrides."""
    now = {name: run for run in running if run.state == "RUNNING" and (name := experiment_name(run))}
    rows = [replace(e, running=run_status(now[e.name])) if e.name in now else e for e in experiments]
    names = {e.name for e in experiments}
    for name, run in now.items():
        if name not in names:
            overrides = [o.split("=", 1) for o in run.parameters.get("overrides") or () if "=" in o]
            rows.append(Experiment(name, "", tuple((k, v) for k, v in overrides), (), running=run_status(run)))
    return tuple(rows)
