"""The experiments view (sort, mark, diff) on fakes, and a record → replay round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable

from tests.tui.conftest import settle
from tui.app import make_app
from tui.experiment_table import table_rows
from tui.providers import demo_providers
from tui.providers.models import Experiment, RunQuery
from tui.providers.replay import Recorder, load_replay
from tui.screens.diff import DiffScreen
from tui.screens.experiments import ExperimentsScreen
from tui.widgets.runs_table import RunsTable

pytestmark = pytest.mark.anyio


async def test_sort_mark_and_diff_two_experiments(app):
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        await pilot.press("e")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ExperimentsScreen)
        table = screen.query_one("#exp-table", DataTable)
        accuracy = [c.value for c in table.columns].index("accuracy")
        table.move_cursor(column=accuracy)
        await pilot.press("s", "s")
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        names = [row[1] for row in rows if "▶" not in row[0]]
        assert names[0] == "convnext" and names[-1] == "demo-scratch", "second s sorts by accuracy, highest first"
        assert all("▶" in row[0] for row in rows[len(names):]), "the running runs' experiments, no accuracy yet, stay last"
        await pilot.press("space", "down", "space", "d")
        await pilot.pause()
        assert isinstance(app.screen, DiffScreen)
        rows = {app.screen.query_one(DataTable).get_row_at(i)[0] for i in range(app.screen.query_one(DataTable).row_count)}
        assert rows >= {"model.name", "accuracy"}


def test_experiments_with_the_same_name_in_two_baselines_both_show():
    twins = (Experiment("demo-source", "aaaaaaa", (), ()), Experiment("demo-source", "bbbbbbb", (), ()))
    assert [i for i, _ in table_rows(twins, [])] == [0, 1]


async def test_record_then_replay(tmp_path: Path):
    path = tmp_path / "dash.jsonl"
    recording = Recorder.wrap(demo_providers(runs=50, animate=False), path)
    for _ in range(2):
        recording.telemetry.sample()
        recording.orchestrator.snapshot(RunQuery())
    replay = load_replay(path)
    assert replay.orchestrator.snapshot(RunQuery(states=("RUNNING",))).total_runs == 4
    app = make_app(providers=replay, readonly=True, refresh_s=3600)
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        assert app.screen.query_one(RunsTable).get_cell("run-0002", "gpus") == "2,3"


def test_a_bad_replay_file_is_one_sentence(tmp_path: Path):
    from flows.core.errors import TunedeckError

    with pytest.raises(TunedeckError, match="cannot replay .*record one with"):
        load_replay(tmp_path / "missing.jsonl")
