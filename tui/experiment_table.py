"""Pure helpers for the experiments view: which columns, sorted rows, the diff of two."""

from __future__ import annotations

from tui.providers.models import Experiment

MAX_PARAMS = 6


def table_columns(experiments: tuple[Experiment, ...]) -> list[str]:
    """Params whose value varies between experiments (at most MAX_PARAMS), then every metric."""
    params: dict[str, set[str]] = {}
    for e in experiments:
        for k, v in e.params:
            params.setdefault(k, set()).add(v)
    varying = [k for k, values in params.items() if len(values) > 1][:MAX_PARAMS]
    metrics = sorted({k for e in experiments for k, _ in e.metrics})
    return varying + metrics


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
