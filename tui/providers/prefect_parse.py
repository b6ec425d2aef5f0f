"""Pure helpers turning Prefect's JSON into the dashboard's dataclasses, and queries into filters."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flows.contracts import LABEL, SCORE_PREFIX, StageProgress, scores_from_labels
from flows.contracts import stage_label as stage_label
from flows.core.errors import TunedeckError
from flows.run import overrides
from tui.providers.models import STATES, Deployment, Progress, RunQuery, WorkPool

ONLINE = "ONLINE"


def run_filter(query: RunQuery) -> dict[str, Any]:
    """The flow_runs filter body for a text and state query."""
    runs: dict[str, Any] = {}
    if query.text:
        runs["name"] = {"like_": query.text}
    if query.states:
        runs["state"] = {"type": {"any_": [s for s in query.states if s in STATES]}}
    return {"flow_runs": runs} if runs else {}


def run_progress(labels: dict[str, Any] | None) -> Progress | None:
    """The training progress a run's labels carry (flows.contracts.StageProgress), as the screen's Progress;
    the final scores are not an epoch's, so run_scores() has them."""
    found = StageProgress.from_labels(labels)
    if found is None:
        return None
    metrics = tuple(sorted((k, v) for k, v in found.metrics.items() if not k.startswith(SCORE_PREFIX)))
    return Progress(found.epoch - 1, found.epochs, metrics, found.at, found.eta_s)


def run_scores(labels: dict[str, Any] | None) -> tuple[tuple[str, float], ...]:
    """The final scores a run's labels carry (test/acc, test/macro_f1), sorted by name."""
    return tuple(sorted(scores_from_labels(labels).items()))


def run_cost(labels: dict[str, Any] | None) -> tuple[tuple[str, float | str], ...]:
    """The training's energy and cost a run's labels carry (flows.run.labels.label_cost), sorted by name:
    ("cost/total", 0.0012), ("energy/cpu_wh", "unknown"), ... ("unknown": a counter the run could not read)."""
    found = []
    for key, value in (labels or {}).items():
        group, _, name = key.removeprefix(LABEL).partition(".")
        if key.startswith(LABEL) and group in ("energy", "cost") and name:
            try:
                found.append((f"{group}/{name}", float(value)))
            except (TypeError, ValueError):
                found.append((f"{group}/{name}", str(value)))
    return tuple(sorted(found))


def host_label(labels: dict[str, Any] | None) -> str | None:
    """The host whose worker runs the flow run (its ``tunedeck.host`` label)."""
    value = (labels or {}).get(f"{LABEL}host")
    return str(value) if value else None


def gpus_label(labels: dict[str, Any] | None) -> tuple[int, ...]:
    """The GPU indices a run holds (its ``tunedeck.gpus`` label, like "0" or "0,1")."""
    value = str((labels or {}).get(f"{LABEL}gpus") or "")
    return tuple(int(i) for i in value.split(",") if i.strip().isdigit())


def schedule_text(schedules: list[dict]) -> str:
    """A deployment's schedules in a few words: cron, every N, or rrule."""
    parts = []
    for item in schedules or []:
        sched = item.get("schedule") or {}
        if "cron" in sched:
            parts.append(f"cron {sched['cron']}")
        elif "interval" in sched:
            parts.append(f"every {_interval(sched['interval'])}")
        elif "rrule" in sched:
            parts.append("rrule")
    return ", ".join(parts) or "none"


def _interval(seconds: float) -> str:
    seconds = float(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def deployment(d: dict, flows: dict[str, str], upcoming: dict[str, list[float]], last: dict[str, str]) -> Deployment:
    """One deployment row from the API's JSON and the runs looked up beside it."""
    schema = (d.get("parameter_openapi_schema") or {}).get("properties") or {}
    schedules = d.get("schedules") or []
    return Deployment(
        d["id"], d["name"], flows.get(d["flow_id"], "?"), schedule_text(schedules),
        bool(d.get("paused")), tuple(upcoming.get(d["id"], ())[:3]), last.get(d["id"]), d.get("work_pool_name"),
        tuple(schema), schedule_active=not schedules or any(s.get("active", True) for s in schedules),
    )


def pool(p: dict, workers: list[dict]) -> WorkPool:
    """A work pool and how many of its workers are online."""
    online = sum(1 for w in workers if w.get("status") == ONLINE)
    return WorkPool(p["name"], p.get("status") or "?", online, len(workers))


def parse_overrides(text: str) -> dict[str, Any]:
    """``train.lr=0.001 train.epochs=3`` → a nested dict of YAML-typed values, read by the one overrides
    parser (flows.run.overrides); raises ValueError with its sentence."""
    result: dict[str, Any] = {}
    for key, value in flat_overrides(text).items():
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return result


def flat_overrides(text: str) -> dict[str, Any]:
    """{'train.lr': 0.001, ...} from run-now's text; ValueError with the parser's sentence."""
    try:
        return overrides.parse_overrides(text.split())
    except TunedeckError as exc:
        raise ValueError(str(exc)) from None


def utc(ts: float) -> str:
    """A timestamp as ``MM-DD HH:MM`` UTC."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%m-%d %H:%M")


def run_parameters(parameter_names: tuple[str, ...], text: str) -> dict[str, Any]:
    """Run-now overrides as parameters: a list for a deployment that takes ``overrides``, else a nested dict."""
    if "overrides" in parameter_names:
        flat_overrides(text)  # checked here, in the dialog: a bad one is its sentence, not a failed run
        return {"overrides": text.split()} if text.strip() else {}
    return parse_overrides(text)
