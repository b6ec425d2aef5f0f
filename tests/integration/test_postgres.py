"""The shared server on PostgreSQL: `tunedeck server start --database`, runs through a worker, read by the dashboard.

The PostgreSQL is the one .ci/run started (TUNEDECK_TEST_POSTGRES_URL), else a throwaway
cluster (tests/integration/postgres.py); each test gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli.main import main
from tests.integration.postgres import ENV, fresh_database, throwaway_cluster, unavailable
from tests.integration.project import api, env, free_port, run
from tui.providers.models import RunQuery
from tui.providers.prefect_api import PrefectApi

RUNS = 3
SQUARES = 3  # tasks per run
SHORT_FLOW = f'''
from prefect import flow, task


@task
def square(x: int) -> int:
    return x * x


@flow(name="pg-short")
def short(n: int = {SQUARES}) -> int:
    return sum(square(i) for i in range(n))
'''


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server's admin URL (a role that may create databases): .ci/run's, else a throwaway cluster.

    Where none can be had the test is skipped; in CI (whose .ci/run installs it) that is a failure.
    """
    why = unavailable()
    if why and os.environ.get("CI"):
        pytest.fail(f"{why} (.ci/run should have set it up)")
    if why:
        pytest.skip(why)
    if os.environ.get(ENV):
        yield os.environ[ENV]
    else:
        with throwaway_cluster() as admin:
            yield admin


def one_sentence(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_database_that_is_down_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    down = f"postgresql+asyncpg://team:pw@127.0.0.1:{free_port()}/prefect"
    assert main(["server", "start", "--port", str(free_port()), "--database", down]) == 2
    assert "does not answer (connection refused): start PostgreSQL there" in one_sentence(capsys)
    assert not (tmp_path / ".tunedeck" / "server.json").exists(), "no server is started on a database that is down"


def test_a_bad_database_url_is_one_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    port = str(free_port())
    assert main(["server", "start", "--port", port, "--database", "postgresql://team:pw@db:5432/prefect"]) == 2
    assert "needs asyncpg, so write it as postgresql+asyncpg://" in one_sentence(capsys)
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "mysql://team:pw@db/prefect")
    assert main(["server", "start", "--port", port]) == 2
    assert "PREFECT_API_DATABASE_CONNECTION_URL names a mysql database" in one_sentence(capsys)


async def _count(url: str, table: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1), timeout=10)
    try:
        return await connection.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        await connection.close()


def deploy_short_flow(url: str, folder: Path) -> str:
    """A process work pool "pg" and a deployment of SHORT_FLOW (written to folder), through the REST API; its id."""
    (folder / "short.py").write_text(SHORT_FLOW)
    api(url, "work_pools/", {"name": "pg", "type": "process"})
    flow_id = api(url, "flows/", {"name": "pg-short"})["id"]
    return api(url, "deployments/", {
        "name": "short", "flow_id": flow_id, "work_pool_name": "pg", "entrypoint": "short.py:short",
        "path": str(folder), "pull_steps": [{"prefect.deployments.steps.set_working_directory": {"directory": str(folder)}}],
    })["id"]


def _wait_all(url: str, ids: list[str], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})
        if all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        assert time.monotonic() < deadline, [(r["name"], r["state_type"]) for r in runs]
        time.sleep(0.5)


@pytest.mark.slow
def test_a_refused_login_or_a_missing_database_is_one_sentence(postgres, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    port = str(free_port())
    with fresh_database(postgres) as database:
        user, rest = database.removeprefix("postgresql+asyncpg://").split(":", 1)
        wrong = f"postgresql+asyncpg://{user}:wrong-password@{rest.split('@', 1)[1]}"
        assert main(["server", "start", "--port", port, "--database", wrong]) == 2
        assert f"refused the login of user '{user}'" in one_sentence(capsys)
        missing = database.rsplit("/", 1)[0] + "/no_such_db"
        assert main(["server", "start", "--port", port, "--database", missing]) == 2
        assert "the database 'no_such_db' does not exist" in one_sentence(capsys)
    assert not (tmp_path / ".tunedeck" / "server.json").exists()


@pytest.mark.slow
def test_server_on_postgres_runs_flows_the_dashboard_reads(postgres, tmp_path):
    """Hang guards only (the whole test takes about a minute on 2 busy cores; pyproject's 600 s timeout)."""
    with fresh_database(postgres) as database:
        port = free_port()
        started = run(tmp_path, "tunedeck", "server", "start", "--port", str(port), "--database", database, timeout=90)
        assert "on PostgreSQL at 127.0.0.1:" in started.stdout, started.stdout
        url = f"http://127.0.0.1:{port}/api"
        worker = None
        try:
            deployment = deploy_short_flow(url, tmp_path)
            ids = [api(url, f"deployments/{deployment}/create_flow_run", {"parameters": {}})["id"] for _ in range(RUNS)]
            worker = subprocess.Popen(
                ["prefect", "worker", "start", "--pool", "pg", "--type", "process", "--limit", str(RUNS)], cwd=tmp_path,
                env=env(PREFECT_API_URL=url, PREFECT_WORKER_QUERY_SECONDS="0.5", PREFECT_WORKER_PREFETCH_SECONDS="1"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            asked = time.monotonic()
            runs = _wait_all(url, ids, timeout=300)  # a hang guard: a fresh worker runs the three in well under a minute
            print(f"\n{RUNS} runs final {time.monotonic() - asked:.1f} s after the worker started")
            assert {r["state_type"] for r in runs} == {"COMPLETED"}, [(r["name"], r["state_name"]) for r in runs]

            snapshot = PrefectApi(url).snapshot(RunQuery())
            assert snapshot.connected, snapshot.error
            assert snapshot.total_runs == RUNS
            assert {(r.id, r.flow, r.state, r.deployment) for r in snapshot.runs} == {
                (i, "pg-short", "COMPLETED", "short") for i in ids}
            assert [(d.name, d.flow) for d in snapshot.deployments] == [("short", "pg-short")]
            assert [p.name for p in snapshot.pools] == ["pg"] and snapshot.pools[0].workers_online == 1

            assert asyncio.run(_count(database, "flow_run")) == RUNS, "the runs are stored in PostgreSQL"
            stored = time.monotonic()
            deadline = stored + 120  # a hang guard: task runs reach the database through the events pipeline, in ~1 s
            while asyncio.run(_count(database, "task_run")) < RUNS * SQUARES:
                assert time.monotonic() < deadline, "the task runs never reached PostgreSQL"
                time.sleep(0.5)
            print(f"the task runs were in PostgreSQL {time.monotonic() - stored:.1f} s after the flow runs")
        finally:
            if worker is not None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=30)
            run(tmp_path, "tunedeck", "server", "stop", check=False)
