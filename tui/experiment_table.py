"""Pure helpers for the experiments view: which columns (metrics, then changed params), sorted rows, the diff of two."""

from __future__ import annotations

from tui.providers.models import Experiment

MAX_PARAMS = 6


def table_columns(experiments: tuple[Experiment, ...]) -> list[str]:
    """The older params-first order: params that vary (at most MAX_PARAMS), then every metric. The view uses columns()."""
    return changed_params(experiments)[:MAX_PARAMS] + metric_keys(experiments)


def columns(experiments: tuple[Experiment, ...], all_params: bool = False) -> list[str]:
    """Every metric first, then params: only those that differ between rows (``--only-changed``) unless all_params."""
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
    """(index into experiments, cells) per experiment, sorted by a column (missing values last)."""
    rows = list(range(len(experiments)))
    if sort in ("experiment", "rev") or sort in columns:
        def key(i: int):
            e = experiments[i]
            value = e.name if sort == "experiment" else e.rev if sort == "rev" else _cell(e, sort)
            return (value is None, _as_number(value))
        rows.sort(key=key, reverse=reverse)
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
