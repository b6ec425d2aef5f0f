"""The shared server under load: SQLite against PostgreSQL, side by side in one run (issue 12).

For each backend, a fresh tunedeck server (flows.host.server.start; PostgreSQL through --database's
setting) on 127.0.0.1, a process work pool, WORKERS Prefect workers (one run at a time each)
and RUNS short flow runs of one deployment, each running three tasks. Once the first run has
started, DASHBOARDS dashboards poll on top with the dashboard's own provider calls at its
rates: PrefectApi.snapshot every 2 s (the dashboard polls Prefect every 2 × refresh, default
1 s) and RemoteHosts.hosts (the telemetry events query) every 1 s, until every run has ended.

Printed per backend:
  p50/p95   latency of every HTTP request the dashboards made (ms), and of the run submissions
  503       503s the dashboards and the submitter got (before their retries), and every 503 the
            server sent anyone (it logs each: PREFECT_SERVER_LOG_RETRYABLE_ERRORS=true)
  locked    "database is locked" errors: the server's logged ERROR records (requests and its own
            services) and the replies that said so; 500s; every ERROR record the server logged;
            dashboard requests that failed (timeout, refused)
  runs      submissions refused even after ~35 s of retries, runs that did not end Completed (both
            count against the 200), and the wall time from the first submission to the last end
PostgreSQL: --database names a role that may create databases (or TUNEDECK_TEST_POSTGRES_URL);
without either, a throwaway cluster with PostgreSQL's default (durable) settings is made.
Usage: python bench/server_load.py [--runs 200] [--workers 8] [--dashboards 4] [--database URL]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.host import server  # noqa: E402
from flows.host.server_database import OLD_SETTING, SETTING  # noqa: E402
from tests.integration.postgres import ENV, fresh_database, throwaway_cluster  # noqa: E402
from tests.integration.project import env, free_port  # noqa: E402
from tests.integration.test_postgres import deploy_short_flow  # noqa: E402
from tui.providers.fleet import RemoteHosts  # noqa: E402
from tui.providers.models import RunQuery  # noqa: E402
from tui.providers.prefect_api import PrefectApi  # noqa: E402

REFRESH_S = 1.0  # the dashboard's default --refresh
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Meter:
    """Every request's latency (to the end of its body) and status, whichever thread made it."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    locked: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def transport(self) -> httpx.BaseTransport:
        return _Timed(httpx.HTTPTransport(), self)

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class _Timed(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport, meter: Meter) -> None:
        self.inner, self.meter = inner, meter

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        began = time.perf_counter()
        try:
            response = self.inner.handle_request(request)
            body = response.read()
        except httpx.HTTPError:
            with self.meter.lock:
                self.meter.failed += 1
            raise
        with self.meter.lock:
            self.meter.latencies.append(time.perf_counter() - began)
            self.meter.statuses[response.status_code] += 1
            self.meter.locked += b"database is locked" in body
        return response


def metered_client(meter: Meter, timeout: float = 3.0) -> httpx.Client:
    return httpx.Client(timeout=timeout, transport=meter.transport())


def dashboard(url: str, meter: Meter, stop: threading.Event) -> list[threading.Thread]:
    """One dashboard's two pollers, its own providers with their HTTP clients metered."""
    prefect, hosts = PrefectApi(url), RemoteHosts(lambda: url)
    prefect._http = metered_client(meter, prefect.timeout)  # the provider's own calls, timed at the transport
    hosts._http = metered_client(meter)

    def poll_prefect() -> None:
        while not stop.is_set():
            began = time.monotonic()
            prefect.snapshot(RunQuery())
            stop.wait(max(0.0, 2 * REFRESH_S - (time.monotonic() - began)))  # a busy tick is skipped, as set_interval does

    def poll_telemetry() -> None:
        while not stop.wait(REFRESH_S):
            hosts.hosts()

    return [threading.Thread(target=poll_prefect, daemon=True), threading.Thread(target=poll_telemetry, daemon=True)]


def post(client: httpx.Client, url: str, path: str, body: dict, tries: int = 10):
    """POST with retries on 429/502/503 (backoff up to 5 s, about 35 s in all), as Prefect's client does;
    each 503 is counted by the meter."""
    for attempt in range(tries):
        response = client.post(f"{url}/{path}", json=body)
        if response.status_code not in (429, 502, 503) or attempt == tries - 1:
            response.raise_for_status()
            return response.json()
        time.sleep(min(5.0, 0.25 * 2**attempt))
    raise AssertionError("unreachable")


def submit(client: httpx.Client, url: str, deployment: str, runs: int) -> tuple[list[str], int]:
    """Create the flow runs; the ids, and how many were refused even after the retries."""
    ids, refused = [], 0
    for _ in range(runs):
        try:
            ids.append(post(client, url, f"deployments/{deployment}/create_flow_run", {})["id"])
        except httpx.HTTPError:  # 503s past the retries, or the connection reset by a struggling server
            refused += 1
    return ids, refused


@contextmanager
def workers(url: str, folder: Path, count: int) -> Iterator[list[subprocess.Popen]]:
    """count Prefect process workers on the pool, one run at a time each; stopped (their groups) on exit."""
    procs = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(
                ["prefect", "worker", "start", "--pool", "pg", "--type", "process", "--limit", "1"], cwd=folder,
                env=env(PREFECT_API_URL=url, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        yield procs
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def load(name: str, database_url: str | None, runs: int, n_workers: int, n_dashboards: int,
         keep_logs: Path | None = None) -> dict:
    """One backend under the whole load; its figures."""
    with tempfile.TemporaryDirectory(prefix=f"tunedeck-load-{name}-") as tmp:
        folder = Path(tmp)
        url = server.start(free_port(), root=folder, database_url=database_url)
        dash, submitter, stop = Meter(), Meter(), threading.Event()
        try:
            client = metered_client(submitter, timeout=30)
            deployment = deploy_short_flow(url, folder)
            with workers(url, folder, n_workers):
                _wait(lambda: sum(w["status"] == "ONLINE" for w in post(client, url, "work_pools/pg/workers/filter", {}))
                      >= n_workers, 120, "workers online")
                began = time.monotonic()
                ids, refused = submit(client, url, deployment, runs)
                _wait(lambda: _states(client, url, ids)["started"] > 0, 300, "a first run starting")
                pollers = [t for _ in range(n_dashboards) for t in dashboard(url, dash, stop)]
                for thread in pollers:
                    thread.start()
                _wait(lambda: _states(client, url, ids)["final"] == len(ids), 3600, "every run ending")
                wall = time.monotonic() - began
                stop.set()
                for thread in pollers:
                    thread.join(timeout=10)
                states = _states(client, url, ids)
        finally:
            stop.set()
            server.stop(root=folder)
            log = (folder / ".tunedeck" / "server.log").read_text(errors="replace")
            if keep_logs:  # kept even when the load fails
                keep_logs.mkdir(parents=True, exist_ok=True)
                (keep_logs / f"server-{name}.log").write_text(log)
    return {
        "backend": name, "runs": runs, "wall_s": wall, "not_completed": runs - states["completed"], "refused": refused,
        "dash_calls": len(dash.latencies), "dash_p50": dash.p(0.5), "dash_p95": dash.p(0.95),
        "submit_p50": submitter.p(0.5), "submit_p95": submitter.p(0.95),
        "client_503": dash.statuses[503] + submitter.statuses[503], "dash_failed": dash.failed,
        "server_503": log.count("Encountered retryable exception in request"),
        "server_500": log.count("Encountered exception in request"),
        "locked": sum("database is locked" in r for r in errors_logged(log)) + dash.locked + submitter.locked,
        "errors_logged": len(errors_logged(log)),
    }


RECORD = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ", re.MULTILINE)


def errors_logged(log: str) -> list[str]:
    """The server log's ERROR records, each with its traceback; uvicorn's echo of a request's exception, which
    Prefect has logged just before, is left out."""
    starts = [m.start() for m in RECORD.finditer(log)] + [len(log)]
    records = [log[a:b] for a, b in zip(starts, starts[1:], strict=False)]
    return [r for r in records if r.split("|", 2)[1].strip() == "ERROR" and "Exception in ASGI application" not in r]


def _states(client: httpx.Client, url: str, ids: list[str]) -> Counter:
    counts: Counter = Counter()
    for offset in range(0, len(ids), 200):
        for r in post(client, url, "flow_runs/filter", {"flow_runs": {"id": {"any_": ids[offset:offset + 200]}}, "limit": 200}):
            counts["started"] += r["state_type"] != "SCHEDULED" and r["state_type"] != "PENDING"
            counts["final"] += r["state_type"] in FINAL
            counts["completed"] += r["state_type"] == "COMPLETED"
    return counts


def _wait(done, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not _answered(done):
        if time.monotonic() > deadline:
            raise SystemExit(f"server_load: gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(1.0)


def _answered(done) -> bool:
    """done(), or False while the server refuses even after the retries (a locked SQLite)."""
    try:
        return done()
    except httpx.HTTPError:
        return False


def report(rows: list[dict]) -> None:
    print(f"\n{'backend':<11}{'runs':>5}{'wall s':>8}{'dash calls':>11}{'p50 ms':>8}{'p95 ms':>8}{'submit p50/p95 ms':>19}"
          f"{'503 client':>11}{'503 server':>11}{'locked':>7}{'500':>5}{'errors':>7}{'failed':>7}{'refused':>8}{'not done':>9}")
    for r in rows:
        print(f"{r['backend']:<11}{r['runs']:>5}{r['wall_s']:>8.0f}{r['dash_calls']:>11}{r['dash_p50']:>8.0f}{r['dash_p95']:>8.0f}"
              f"{r['submit_p50']:>10.0f} / {r['submit_p95']:<6.0f}{r['client_503']:>11}{r['server_503']:>11}{r['locked']:>7}"
              f"{r['server_500']:>5}{r['errors_logged']:>7}{r['dash_failed']:>7}{r['refused']:>8}{r['not_completed']:>9}")


def errors(row: dict) -> int:
    """The server's errors: 503s, lock errors, 500s, any ERROR it logged, and runs lost. A dashboard request that
    timed out (the provider's 3 s) is reported in its own column, not here: on an overloaded machine it measures
    the CPU the server got, not the database."""
    return (row["client_503"] + row["server_503"] + row["locked"] + row["server_500"] + row["errors_logged"]
            + row["not_completed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--dashboards", type=int, default=4)
    parser.add_argument("--database", help="a PostgreSQL server's URL whose role may create databases")
    parser.add_argument("--only", choices=["sqlite", "postgres"], help="one backend only")
    parser.add_argument("--logs", type=Path, help="keep each server's log in this folder")
    args = parser.parse_args()
    for name in (SETTING, OLD_SETTING):
        os.environ.pop(name, None)  # the SQLite side is tunedeck's default, whatever this shell has
    os.environ["PREFECT_SERVER_LOG_RETRYABLE_ERRORS"] = "true"
    print(f"server load: {args.runs} runs (3 tasks each), {args.workers} workers, {args.dashboards} dashboards; "
          f"{os.cpu_count()} CPUs", flush=True)
    rows = []
    if args.only != "sqlite":
        with ExitStack() as stack:
            admin = args.database or os.environ.get(ENV) or stack.enter_context(throwaway_cluster(durable=True))
            rows.append(load("PostgreSQL", stack.enter_context(fresh_database(admin)), args.runs, args.workers, args.dashboards, args.logs))
        report(rows)
    if args.only != "postgres":
        rows.append(load("SQLite", None, args.runs, args.workers, args.dashboards, args.logs))
        report(rows)
    postgres = next((r for r in rows if r["backend"] == "PostgreSQL"), None)
    if postgres is not None and errors(postgres):
        raise SystemExit(f"server_load: PostgreSQL had {errors(postgres)} errors; it must have none")


if __name__ == "__main__":
    main()
