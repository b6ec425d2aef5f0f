"""End to end: a real local Prefect server, a real flow run in a subprocess, cancelled from the dashboard;
and the real `tunedeck dash --demo` in a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.host import server
from tests.integration.project import api, env, free_port
from tests.tui.conftest import settle
from tui.app import make_app
from tui.providers.base import Providers
from tui.providers.fake_dvc import FakeDvc
from tui.providers.fake_gpu import FakeHost, FakeNvml
from tui.providers.prefect_api import PrefectApi
from tui.providers.telemetry import NvmlTelemetry
from tui.widgets.runs_table import RunsTable

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FLOW = textwrap.dedent("""
    import time
    from prefect import flow

    @flow(name="dash-e2e", persist_result=False)
    def sleepy():
        print("started", flush=True)
        time.sleep(120)

    sleepy()
""")


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """A local Prefect server on a free port, stopped afterwards."""
    root = tmp_path_factory.mktemp("dash-project")
    url = server.start(free_port(), root=root)
    yield url
    server.stop(root=root)


def _runs(url: str) -> list[dict]:
    return api(url, "flow_runs/filter")


async def _until(pilot, check, timeout: float = 60.0) -> None:
    """Drive the app until check() holds; timeout is a hang guard (each event comes within a few refreshes)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await settle(pilot, 1)
        await pilot.pause(0.2)


@pytest.mark.anyio
async def test_a_real_flow_run_appears_and_is_cancelled_from_the_dashboard(prefect, tmp_path):
    script = tmp_path / "sleepy.py"
    script.write_text(FLOW)
    proc = subprocess.Popen([sys.executable, str(script)], env=env(PREFECT_API_URL=prefect), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        providers = Providers(NvmlTelemetry(FakeNvml(), FakeHost()), PrefectApi(prefect), FakeDvc(), label="e2e")
        app = make_app(providers=providers, refresh_s=0.25)
        async with app.run_test(size=(140, 42)) as pilot:
            table = app.screen.query_one(RunsTable)
            await _until(pilot, lambda: any(r.flow == "dash-e2e" and r.state == "RUNNING" for r in table.runs.values()), 90)
            run = next(r for r in table.runs.values() if r.flow == "dash-e2e")
            table.move_cursor(row=list(table.runs).index(run.id))
            await pilot.press("c", "y")
            await _until(pilot, lambda: table.runs[run.id].state in ("CANCELLED", "CANCELLING"))
        states = {r["id"]: r["state_type"] for r in _runs(prefect)}
        assert states[run.id] in ("CANCELLED", "CANCELLING")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_demo_in_a_real_terminal(tmp_path):
    session = f"tunedeck-smoke-{os.getpid()}"
    status = tmp_path / "status"
    command = f"{Path(sys.executable).parent / 'tunedeck'} dash --demo; echo $? > {status}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "140", "-y", "42", command], check=True, cwd=ROOT)
    try:
        # wait for the whole first screen: panels fill in one by one, so waiting for their titles alone
        # and then asserting their rows raced the runs' total and the deployments' rows (failed 1 in 3)
        expected = ("GPUs · 12 on 3 hosts", "runs 1–100 of 1000", "deployments", "(train · pipeline)")
        screen = ""
        deadline = time.monotonic() + 60  # a hang guard
        while not all(w in screen for w in expected):
            assert time.monotonic() < deadline, f"missing {[w for w in expected if w not in screen]}:\n{screen}"
            time.sleep(0.2)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        deadline = time.monotonic() + 60  # a hang guard: the app quits at once
        while not status.exists():
            assert time.monotonic() < deadline, "the dashboard did not quit on q"
            time.sleep(0.2)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.mark.anyio
async def test_an_inactive_schedule_reads_off_and_p_shows_what_the_api_then_reports(prefect):
    """A deployment shipped with its schedule off (as prefect.yaml's pipeline) reads `off`; `p` resumes the
    schedule and the panel shows the server's state; `p` + `y` pauses it, and the panel shows that too."""
    from tui.widgets.deployments_table import DeploymentsTable

    flow_id = api(prefect, "flows/", {"name": "weekly"})["id"]
    dep_id = api(prefect, "deployments/", {"name": "retrain", "flow_id": flow_id, "schedules": [
        {"schedule": {"cron": "0 3 * * 1", "timezone": "UTC"}, "active": False}]})["id"]

    def server_state() -> tuple[bool, bool]:
        dep = next(d for d in api(prefect, "deployments/filter") if d["id"] == dep_id)
        return dep["paused"], all(s["active"] for s in dep["schedules"])

    providers = Providers(NvmlTelemetry(FakeNvml(), FakeHost()), PrefectApi(prefect), FakeDvc(), label="e2e")
    app = make_app(providers=providers, refresh_s=0.25)
    async with app.run_test(size=(140, 42)) as pilot:
        table = app.screen.query_one(DeploymentsTable)
        await _until(pilot, lambda: dep_id in table.rows)
        await pilot.press("tab")
        table.move_cursor(row=table.get_row_index(dep_id))
        await settle(pilot)
        assert str(table.get_cell(dep_id, "status")) == "off" and "resume" in str(table.border_subtitle)
        await pilot.press("p")
        await _until(pilot, lambda: str(table.get_cell(dep_id, "status")) == "active")
        assert server_state() == (False, True), "resumed: the schedule is active on the server"
        await pilot.press("p", "y")
        await _until(pilot, lambda: str(table.get_cell(dep_id, "status")) == "paused")
        assert server_state()[0] is True
