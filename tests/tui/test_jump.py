"""From a run to the DVC experiment it made and back (`x`), and the experiments running runs are making (▶)."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable

from tests.tui.conftest import settle
from tui.experiment_table import with_running
from tui.providers.models import Experiment
from tui.screens.dashboard import DashboardScreen
from tui.screens.experiments import ExperimentsScreen
from tui.screens.run_detail import RunDetailScreen
from tui.widgets.runs_table import RunsTable

pytestmark = pytest.mark.anyio


def _row_name(screen: ExperimentsScreen) -> str:
    table = screen.query_one("#exp-table", DataTable)
    return screen.experiments[screen._index(table.cursor_row)].name


async def test_x_goes_from_a_finished_run_to_its_experiment_and_back(app, providers):
    made = providers.experiments.made[0]  # the experiment a finished pipeline run of the fake server saved
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        runs = app.screen.query_one(RunsTable)
        runs.move_cursor(list(runs.runs).index(next(r.id for r in runs.runs.values() if r.name == made.name)))
        await pilot.press("x")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ExperimentsScreen) and _row_name(screen) == made.name
        await pilot.press("x")
        await settle(pilot)
        assert isinstance(app.screen, RunDetailScreen) and app.screen.run.name == made.name
        await pilot.press("x")  # from the detail back to the view it came from, on the same row
        await settle(pilot)
        assert isinstance(app.screen, ExperimentsScreen) and _row_name(app.screen) == made.name
        assert len(app.screen_stack) == 2, "x back and forth never piles screens up"


async def test_a_running_run_s_experiment_is_marked_and_a_stage_run_says_it_made_none(app, providers):
    running = [r for r in providers.orchestrator.runs.running()]
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        await pilot.press("x")  # the first row trains: its experiment is not saved yet, but listed, marked ▶
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ExperimentsScreen) and _row_name(screen) == running[0].name
        table = screen.query_one("#exp-table", DataTable)
        marked = {table.get_row_at(i)[1]: (table.get_row_at(i)[0], table.get_row_at(i)[2]) for i in range(table.row_count)}
        assert all(marked[r.name][0] == "▶" for r in running)
        assert marked[running[0].name][1] == "train 8/12", "what it does now, where its commit will be"
        assert marked["workspace"][0] == ""
        await pilot.press("escape")
        await settle(pilot)
        runs = app.screen.query_one(RunsTable)
        stage = next(i for i, r in enumerate(runs.runs.values()) if r.flow in ("prepare", "train", "evaluate"))
        runs.move_cursor(stage)
        await pilot.press("x")
        await settle(pilot)
        assert isinstance(app.screen, DashboardScreen), "a plain `dvc repro` stage run saved no experiment"


def test_with_running_marks_a_saved_row_and_adds_an_unsaved_one(providers):
    running = tuple(providers.orchestrator.runs.running()[:2])
    saved = (Experiment("main", "2ca95a1", (("train.lr", "0.001"),), (("accuracy", 0.8),)),
             Experiment(running[0].name, "abc1234", (("train.lr", "0.001"),), (("accuracy", 0.9),)))
    rows = with_running(saved, running)
    assert [(e.name, bool(e.running)) for e in rows] == [("main", False), (running[0].name, True), (running[1].name, True)]
    assert rows[2].rev == "" and dict(rows[2].params)["train.lr"] in ("0.001", "0.0003", "0.0001")
