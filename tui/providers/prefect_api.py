"""The Prefect server through its REST API (the same API the Prefect client and UI use).

Plain httpx keeps the dashboard's start fast (importing the Prefect client takes seconds);
every call has a short timeout so a server that is down shows a banner, never a hang.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx

from flows.gateways.prefect_api import rest
from tui.providers.base import ActionError
from tui.providers.models import MonitorView, Orchestration, Run, RunDetail, RunQuery
from tui.providers.prefect_parse import (
    deployment,
    gpus_label,
    host_label,
    pool,
    run_cost,
    run_filter,
    run_progress,
    run_scores,
    stage_label,
)

RETRIES = 2  # extra tries on 429/502/503, 0.25 s then 0.5 s apart


def _default_url() -> str | None:
    from flows.gateways.prefect_api import api_url

    return api_url()


class PrefectApi:
    """Reads runs, deployments and work pools; cancels, retries, pauses and runs deployments."""

    def __init__(self, url: str | Callable[[], str | None] | None = None, timeout: float = 3.0) -> None:
        self._url = url if callable(url) else (lambda: url) if url else _default_url
        self.timeout = timeout
        self._http = rest(timeout=timeout)
        self._flows: dict[str, str] = {}

    @property
    def url(self) -> str | None:
        """The API URL now (PREFECT_API_URL, else the local server); re-read so a late start is seen."""
        return self._url()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        url = self.url
        if not url:
            raise ConnectionError("no Prefect server is running (start one with `tunedeck server start`)")
        for attempt in range(RETRIES + 1):
            response = self._http.request(method, f"{url.rstrip('/')}/{path}", json=body)
            # 503 is a busy SQLite server ("database is locked"); Prefect's own client retries it too.
            if response.status_code not in (429, 502, 503) or attempt == RETRIES:
                break
            time.sleep(0.25 * 2**attempt)
        if response.status_code >= 400:
            raise ActionError(f"the Prefect server refused {path} ({response.status_code}): {response.text[:160]}")
        return response.json() if response.content else None

    def snapshot(self, query: RunQuery) -> Orchestration:
        """A page of runs, the deployments and pools; a failure becomes connected=False and a sentence."""
        try:
            return self._snapshot(query)
        except (httpx.HTTPError, ConnectionError, ActionError, ValueError) as exc:
            return Orchestration(False, self.url, error=_why(exc, self.url))

    def _snapshot(self, query: RunQuery) -> Orchestration:
        deployments_raw = self._call("POST", "deployments/filter", {"limit": 200})
        names = {d["id"]: d["name"] for d in deployments_raw}
        filt = run_filter(query)
        runs_raw = self._call("POST", "flow_runs/filter", {**filt, "sort": "START_TIME_DESC", "limit": query.limit, "offset": query.offset})
        total = self._call("POST", "flow_runs/count", filt)
        running_raw = self._call("POST", "flow_runs/filter", {
            "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}, "sort": "START_TIME_DESC", "limit": 100})
        self._learn_flows({r["flow_id"] for r in runs_raw + running_raw} | {d["flow_id"] for d in deployments_raw})
        runs = tuple(self._run(r, names) for r in runs_raw)
        running = tuple(self._run(r, names) for r in running_raw)
        upcoming, last = self._deployment_runs(list(names))
        deployments = tuple(deployment(d, self._flows, upcoming, last) for d in deployments_raw)
        pools = tuple(pool(p, self._workers(p["name"])) for p in self._call("POST", "work_pools/filter", {}))
        return Orchestration(True, self.url, runs, total, deployments, pools, running=running)

    def _learn_flows(self, ids: set[str]) -> None:
        missing = [i for i in ids if i not in self._flows]
        if missing:
            for f in self._call("POST", "flows/filter", {"flows": {"id": {"any_": missing}}}):
                self._flows[f["id"]] = f["name"]

    def _run(self, r: dict, deployment_names: dict[str, str]) -> Run:
        start = _ts(r.get("start_time"))
        end = _ts(r.get("end_time"))
        duration = (end or time.time()) - start if start else None
        labels = r.get("labels") or {}
        return Run(
            r["id"], r["name"], self._flows.get(r["flow_id"], "?"), r.get("state_type") or "?",
            r.get("state_name") or "", start, duration, deployment_names.get(r.get("deployment_id")),
            r.get("deployment_id"), tuple(r.get("tags") or ()), r.get("parameters") or {},
            stage_label(labels), run_progress(labels), host_label(labels), gpus_label(labels), run_scores(labels),
            run_cost(labels),
        )

    def _deployment_runs(self, ids: list[str]) -> tuple[dict[str, list[float]], dict[str, str]]:
        if not ids:
            return {}, {}
        upcoming: dict[str, list[float]] = {}
        scheduled = self._call("POST", "flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": ids}, "state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC", "limit": 3 * len(ids)})
        for r in scheduled:
            upcoming.setdefault(r["deployment_id"], []).append(_ts(r.get("expected_start_time")) or 0.0)
        last: dict[str, str] = {}
        recent = self._call("POST", "flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": ids}, "state": {"type": {"not_any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_DESC", "limit": 200})
        for r in recent:
            last.setdefault(r["deployment_id"], r.get("state_type") or "?")
        return upcoming, last

    def _workers(self, pool_name: str) -> list[dict]:
        try:
            return self._call("POST", f"work_pools/{pool_name}/workers/filter", {})
        except ActionError:
            return []

    def monitor(self) -> MonitorView:
        """The monitor's last batches and the retrains drift started; a failure is the view's error."""
        from tui.providers.monitor_api import read_monitor

        try:
            return read_monitor(self._call)
        except (httpx.HTTPError, ConnectionError, ActionError, ValueError) as exc:
            return MonitorView(error=_why(exc, self.url))

    def detail(self, run_id: str) -> RunDetail:
        """The run's log lines (oldest first) and the markdown of its artifacts."""
        try:
            logs = self._call("POST", "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200})
            arts = self._call("POST", "artifacts/filter", {"artifacts": {
                "flow_run_id": {"any_": [run_id]}, "type": {"not_any_": ["result", "progress"]}}})
        except (httpx.HTTPError, ConnectionError, ActionError) as exc:
            return RunDetail((f"(logs unavailable: {_why(exc, self.url)})",))
        lines = tuple(f"{(lg.get('timestamp') or '')[11:19]} {lg.get('message', '')}" for lg in logs)
        return RunDetail(lines, tuple(str(a.get("data") or "") for a in arts))

    def _act(self, method: str, path: str, body: Any, done: str) -> str:
        try:
            self._call(method, path, body)
        except (httpx.HTTPError, ConnectionError) as exc:
            raise ActionError(_why(exc, self.url)) from None
        return done

    def cancel(self, run_id: str) -> str:
        """Cancelling when a worker can stop the run's process, else Cancelled at once."""
        run = self._call("GET", f"flow_runs/{run_id}")
        state = "CANCELLING" if run.get("deployment_id") and run.get("state_type") == "RUNNING" else "CANCELLED"
        body = {"state": {"type": state, "name": state.title(), "message": "cancelled from tunedeck dash"}, "force": True}
        return self._act("POST", f"flow_runs/{run_id}/set_state", body, f"Run {run['name']} is {state.lower()}.")

    def retry(self, run_id: str) -> str:
        """A deployment run goes back to Scheduled (AwaitingRetry), so a worker picks it up again."""
        run = self._call("GET", f"flow_runs/{run_id}")
        if not run.get("deployment_id"):
            raise ActionError(f"Run {run['name']} has no deployment, so no worker can retry it: run `dvc repro` again.")
        body = {"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True}
        return self._act("POST", f"flow_runs/{run_id}/set_state", body, f"Run {run['name']} is scheduled to retry.")

    def set_paused(self, deployment_id: str, paused: bool) -> str:
        """Pause the deployment; or resume it, with its inactive schedules made active (what
        `prefect deployment schedule resume` does: a schedule shipped `active: false` starts only then)."""
        if paused:
            return self._act("POST", f"deployments/{deployment_id}/pause_deployment", None, "Schedule paused.")
        done = self._act("POST", f"deployments/{deployment_id}/resume_deployment", None, "Schedule resumed.")
        try:
            schedules = self._call("GET", f"deployments/{deployment_id}/schedules") or []
        except (httpx.HTTPError, ConnectionError) as exc:
            raise ActionError(_why(exc, self.url)) from None
        for schedule in schedules:
            if not schedule.get("active", True):
                self._act("PATCH", f"deployments/{deployment_id}/schedules/{schedule['id']}", {"active": True}, done)
        return done

    def run_now(self, deployment_id: str, parameters: dict) -> str:
        """A flow run of the deployment, now, with parameters merged over its defaults."""
        body = {"parameters": parameters, "state": {"type": "SCHEDULED", "name": "Scheduled"}}
        created = self._call("POST", f"deployments/{deployment_id}/create_flow_run", body)
        return f"Flow run {created['name']} created."


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def _why(exc: Exception, url: str | None) -> str:
    if isinstance(exc, ConnectionError | ActionError):
        return str(exc)
    return f"the Prefect server at {url} does not answer ({type(exc).__name__})"
