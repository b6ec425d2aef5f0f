"""The monitor's batches and the retrains they started, from the Prefect server: every batch is a
`tunedeck.monitor.batch` event, a retrain is a pipeline run labelled with the drift that started it,
so any host's dashboard shows the same (flows.ship.monitor emits them)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from flows.contracts import LABEL, MONITOR_EVENT, MonitorBatch
from tui.providers.models import DriftPoint, MonitoredBatch, MonitorView, Retrain

BATCHES = 30  # the batches shown (their history makes the sparklines)
DAYS = 90


def batch_view(batch: MonitorBatch) -> MonitoredBatch:
    """The contract's batch as the screen's frozen dataclass."""
    stats = tuple(DriftPoint(s.name, s.value, s.threshold, s.flagged, s.direction) for s in batch.statistics)
    atc = batch.estimated_accuracy.get("atc")
    return MonitoredBatch(batch.at, batch.folder, batch.model_version, batch.n_images, batch.drifted, batch.streak,
                          batch.triggered, stats, (atc.value, atc.low, atc.high) if atc else None,
                          batch.reference_accuracy, batch.accuracy,
                          tuple((name, p.value) for name, p in batch.priors.items()))


def read_monitor(call) -> MonitorView:
    """The view through call(method, path, body) (PrefectApi._call): events, then the drift-started pipeline runs."""
    since = datetime.now(UTC) - timedelta(days=DAYS)
    body = {"filter": {"occurred": {"since": since.isoformat(), "until": (datetime.now(UTC) + timedelta(hours=1)).isoformat()},
                       "event": {"name": [MONITOR_EVENT]}, "order": "DESC"}, "limit": BATCHES}
    batches = []
    for event in (call("POST", "events/filter", body) or {}).get("events") or []:
        try:
            batches.append(batch_view(MonitorBatch.model_validate(event.get("payload") or {})))
        except ValidationError:
            continue  # another version's event
    runs = call("POST", "flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 200}) or []
    retrains = tuple(Retrain(r["name"], (r.get("state_type") or "").title(), str(r["labels"][f"{LABEL}reason"]),
                             _ts(r.get("start_time")))
                     for r in runs if (r.get("labels") or {}).get(f"{LABEL}reason"))
    return MonitorView(tuple(sorted(batches, key=lambda b: b.at)), retrains)


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None
