"""Functional tests: drive the dashboard on fakes with key presses and assert its state."""

from __future__ import annotations

import pytest

from tests.tui.conftest import settle
from tui.screens.confirm import ConfirmScreen
from tui.screens.dashboard import DashboardScreen
from tui.widgets.deployments_table import DeploymentsTable
from tui.widgets.gpu_panel import GpuPanel
from tui.widgets.runs_table import RunsTable

SIZE = (140, 42)
pytestmark = pytest.mark.anyio


async def test_first_screen_joins_gpus_and_runs(app):
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        runs = app.screen.query_one(RunsTable)
        assert len(runs.runs) == 100 and "of 1000" in str(runs.border_title)
        ddp = next(r for r in runs.runs.values() if r.id == "run-0002")
        assert runs.get_cell("run-0002", "gpus") == "2,3", f"{ddp.name} runs on GPUs 2 and 3"
        gpu_rows = app.screen.query_one(GpuPanel).query_one("#gpu-table")
        assert ddp.name in str(gpu_rows.row("gpu3"))
        assert "orphan" in str(gpu_rows.row("gpu5"))
        assert runs.get_cell("run-0000", "epoch") == "8/12"
        remote = next(r for r in runs.runs.values() if r.id == "run-0003")
        assert remote.name in str(gpu_rows.row("gpu-box-2/gpu0")) and "idle" in str(gpu_rows.row("gpu-box-2/gpu1"))
        assert "stale" in str(gpu_rows.row("host:laptop")) and "stale" not in str(gpu_rows.row("host:gpu-box-2"))


async def test_filter_by_state_and_text(app):
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("slash", *"failed evaluate", "enter")
        await settle(pilot)
        runs = app.screen.query_one(RunsTable)
        assert runs.runs and all(r.state == "FAILED" and r.flow == "evaluate" for r in runs.runs.values())
        assert "filter: failed 'evaluate'" in str(runs.border_title)
        await pilot.press("escape")
        await settle(pilot)
        assert len(runs.runs) == 100


async def test_keys_typed_in_one_burst_after_slash_reach_the_filter(app, providers):
    """As `tmux send-keys "/ running Enter"` sends them: all queued before the prompt opens; none runs an action."""
    from textual import events

    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        burst = [("slash", "/")] + [(c, c) for c in "running"] + [("enter", None)]
        for key, character in burst:
            app.post_message(events.Key(key, character))
        await settle(pilot)
        runs = app.screen.query_one(RunsTable)
        assert "filter: running" in str(runs.border_title)
        assert runs.runs and all(r.state == "RUNNING" for r in runs.runs.values())
        assert providers.orchestrator.actions == [], "the 'r' (run now) of 'running' must not act"
        assert isinstance(app.screen, DashboardScreen)


async def test_cancel_asks_first_and_no_keeps_the_run(app, providers):
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("c")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await settle(pilot)
        assert providers.orchestrator.actions == []
        await pilot.press("c", "y")
        await settle(pilot)
        assert providers.orchestrator.actions == [("cancel", "run-0000")]
        assert app.screen.query_one(RunsTable).runs["run-0000"].state == "CANCELLED"


async def test_pause_then_resume_a_schedule(app, providers):
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("tab")
        assert isinstance(app.focused, DeploymentsTable)
        await pilot.press("p")  # the pipeline's weekly schedule ships off: p turns it on, no question asked
        await settle(pilot)
        assert providers.orchestrator.actions == [("resume", "dep-pipeline")]
        await pilot.press("p", "y")
        await settle(pilot)
        assert providers.orchestrator.actions[-1] == ("pause", "dep-pipeline")
        assert app.screen.query_one(DeploymentsTable).deployments["dep-pipeline"].paused
        await pilot.press("p")
        await settle(pilot)
        assert providers.orchestrator.actions[-1] == ("resume", "dep-pipeline")


async def test_run_now_with_overrides(app, providers):
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("tab", "r", *"train.lr=0.0003", "enter")
        await settle(pilot)
        assert providers.orchestrator.actions == [("run", "dep-pipeline")]
        assert providers.orchestrator.runs[0].parameters == {"overrides": ["train.lr=0.0003"]}


async def test_readonly_refuses_every_action(readonly_app, providers):
    async with readonly_app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("c", "R", "tab", "p", "r")
        await settle(pilot)
        assert isinstance(readonly_app.screen, DashboardScreen)
        assert providers.orchestrator.actions == []
        shown = {b.binding.action for b in readonly_app.active_bindings.values() if b.enabled}
        assert not shown & {"cancel_run", "retry_run", "toggle_pause", "run_now"}


async def test_colon_commands_switch_views_and_quit(app):
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("colon", *"deployments", "enter")
        await pilot.pause()
        assert isinstance(app.focused, DeploymentsTable) and app.screen.maximized is app.focused
        await pilot.press("escape")
        assert app.screen.maximized is None
        await pilot.press("colon", *"gpus", "enter", "down", "down")
        await pilot.pause()
        gpus = app.screen.query_one(GpuPanel)
        assert app.screen.maximized is gpus, "the whole GPU panel fills the screen: host line and rows"
        assert app.focused is gpus.query_one("#gpu-table") and app.focused.current_key == "gpu2"
        await pilot.press("escape")
        assert app.screen.maximized is None
        await pilot.press("colon", "q", "enter")
        await pilot.pause()
    assert app.return_value == 0


async def test_disconnected_banner_then_reconnect(app, providers):
    providers.orchestrator.connected = False
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        banner = app.screen.query_one("#banner")
        assert banner.display and "disconnected, retrying" in str(banner.render())
        assert app.screen.query_one(GpuPanel).query_one("#gpu-table").row_count == 8 + 1 + 4 + 1, "8 GPUs here, 2 hosts"
        providers.orchestrator.connected = True
        app.screen.poll_prefect()
        await settle(pilot)
        assert not banner.display and len(app.screen.query_one(RunsTable).runs) == 100


async def test_pages_through_thousands_of_runs(app):
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("right_square_bracket")
        await settle(pilot)
        runs = app.screen.query_one(RunsTable)
        assert "runs 101–200 of 1000" in str(runs.border_title)
