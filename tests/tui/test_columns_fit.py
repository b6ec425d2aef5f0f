"""Every panel fits the terminal: a narrow one drops the least useful columns, never the join (RUN, GPUS)."""

from __future__ import annotations

import pytest

from tests.tui.conftest import settle
from tui.widgets.deployments_table import DeploymentsTable
from tui.widgets.gpu_panel import COLUMNS, FULL, GpuPanel, fitting, header
from tui.widgets.runs_table import RunsTable

pytestmark = pytest.mark.anyio


def keys(layout) -> list[str]:
    return [COLUMNS[i][1] for i, _ in layout]


def line_width(layout) -> int:
    return len(header(layout).ljust(sum(w for _, w in layout) + 2 * (len(layout) - 1))) + 1


def test_a_wide_panel_shows_every_column_and_gives_run_the_room_left():
    layout = fitting(200)
    assert keys(layout) == keys(FULL)
    assert dict(layout)[7] == 64, "RUN grows to its cap"
    assert line_width(fitting(138)) <= 138


@pytest.mark.parametrize("width", [60, 78, 100, 118, 130])
def test_a_narrow_panel_keeps_gpu_util_mem_and_run(width):
    layout = fitting(width)
    assert {"gpu", "util", "mem", "run"} <= set(keys(layout))
    assert line_width(layout) <= width or keys(layout) == ["gpu", "util", "mem", "run"]


def test_columns_go_in_order_clocks_first():
    assert keys(fitting(118)) == ["gpu", "util", "hist", "mem", "temp", "power", "run", "procs"]
    assert keys(fitting(78)) == ["gpu", "util", "mem", "run"]


async def test_an_80_column_terminal_names_the_run_on_each_gpu(app, providers):
    async with app.run_test(size=(80, 30)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(GpuPanel).query_one("#gpu-table")
        assert "RUN" in str(table.header) and "CLK" not in str(table.header)
        assert f"{providers.orchestrator.runs[0].name} (train · pipeline)" in str(table.row("gpu0"))
        assert table.virtual_size.width <= table.scrollable_content_region.width, "no sideways scrolling"


async def test_sixteen_gpus_scroll_down_and_never_sideways(providers):
    """More GPUs than the table shows: its scrollbar takes two cells, and the columns fit what is left."""
    from tui.app import make_app
    from tui.providers.base import Providers
    from tui.providers.fake_gpu import FakeHost, FakeNvml
    from tui.providers.telemetry import NvmlTelemetry

    sixteen = Providers(NvmlTelemetry(FakeNvml(count=16), FakeHost()), providers.orchestrator, providers.experiments, label="16")
    app = make_app(providers=sixteen, refresh_s=3600.0)
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        table = app.screen.query_one(GpuPanel).query_one("#gpu-table")
        assert table.row_count == 16 and table.show_vertical_scrollbar
        assert not table.show_horizontal_scrollbar
        assert table.virtual_size.width <= table.scrollable_content_region.width
        table.focus()
        await pilot.press("end")
        await pilot.pause()
        assert table.current_key == "gpu15" and table.render_line(table.size.height - 1).text.strip().startswith("15")


async def test_an_80_column_terminal_keeps_the_runs_progress_scores_and_gpus_and_the_pools_health(app, providers):
    """At 80 columns a finished run still shows its final val acc, test accuracy and macro-F1; the ETA goes first."""
    page = providers.orchestrator.runs[:100]
    pipeline = next(r for r in page if r.flow == "pipeline" and r.state == "COMPLETED")
    evaluate = next(r for r in page if r.flow == "evaluate" and r.state == "COMPLETED")
    async with app.run_test(size=(80, 30)) as pilot:
        await settle(pilot)
        runs = app.screen.query_one(RunsTable)
        assert runs.column_keys == ["state", "name", "stage", "epoch", "acc", "test", "f1", "gpus"]
        assert runs.get_cell("run-0002", "gpus") == "2,3" and not runs.show_horizontal_scrollbar
        val, test, f1 = (dict(pipeline.progress.metrics)["val/acc"], pipeline.score("test/acc"), pipeline.score("test/macro_f1"))
        assert [runs.get_cell(pipeline.id, c) for c in ("acc", "test", "f1")] == [f"{val:.3f}", f"{test:.3f}", f"{f1:.3f}"]
        assert runs.get_cell(evaluate.id, "test") == f"{evaluate.score('test/acc'):.3f}" and runs.get_cell(evaluate.id, "acc") == ""
        deployments = app.screen.query_one(DeploymentsTable)
        assert [c.key.value for c in deployments.columns.values()] == ["name", "schedule", "status", "workers"]
        await pilot.press("down", "down")
        await pilot.resize_terminal(140, 30)
        await settle(pilot)
        assert len(runs.column_keys) == 13 and runs.get_cell("run-0002", "model") == ""
        assert runs.current_key == "run-0002", "the cursor stays on its run when the columns change"
