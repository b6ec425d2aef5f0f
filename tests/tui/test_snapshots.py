"""Snapshot tests: the dashboard's screens on fixed fakes, compared with the SVGs under __snapshots__."""

from __future__ import annotations

from tests.tui.conftest import settle

SIZE = (140, 42)


async def _settled(pilot) -> None:
    await settle(pilot)


def test_dashboard_first_screen(app, snap_compare):
    """The GPU panel (8 GPUs; 0-3 named by their run, 5 flagged orphan, 7 power N/A), runs 1–100 of 1000 with
    epoch 8/12 and ETA on the running training, VAL / TEST / F1 columns (the finished runs' final val acc, test accuracy
    and macro-F1), and the three deployments with pool health."""
    assert snap_compare(app, terminal_size=SIZE, run_before=_settled)


def test_filtered_runs(app, snap_compare):
    """After `/failed`: only Failed runs, and the runs title says 'filter: failed'."""
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("slash", *"failed", "enter")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_cancel_confirmation(app, snap_compare):
    """`c` on the running training asks 'Cancel run calm-tapir-0 (pipeline, running)?' with No focused."""
    assert snap_compare(app, terminal_size=SIZE, run_before=_settled, press=["c"])


def test_readonly_footer(readonly_app, snap_compare):
    """--readonly: the footer lists no cancel, retry, pause or run action; the title says read-only."""
    assert snap_compare(readonly_app, terminal_size=SIZE, run_before=_settled)


def test_disconnected_banner(app, providers, snap_compare):
    """Prefect down: a red 'Prefect disconnected, retrying' banner on top, GPUs still shown, runs waiting."""
    providers.orchestrator.connected = False
    assert snap_compare(app, terminal_size=SIZE, run_before=_settled)


def test_experiments_view(app, snap_compare):
    """`e`: the model registry (prod v0.1.0 after a rollback, its history), seven experiments with the metrics first
    (accuracy, macro_f1), then only the params that differ (model.name, train.lr; '1 equal params hidden'), main marked
    (v0.1.0, prod) and lr-3e-4 (v0.2.0), two saved by finished pipeline runs (named after them), then the four running
    pipeline runs' experiments marked ▶ with their stage and epoch ('train 8/12') where the rev goes, and '▶ 4 running'
    in the status line; the two losses in the left chart, val/acc in the right."""
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("e")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_run_detail(app, snap_compare):
    """Enter on the running training: header with GPUs 0, params, dvclive metrics, and the log on the right."""
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("enter")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_monitor_view(app, snap_compare):
    """`m`: the last batch drifted 3 in a row against v0.2.0 (DRIFT on each statistic, sparklines rising at the end),
    twelve batches newest first with the third drifted one marked '→ retrain', and the retrain run it started."""
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("m")
        await settle(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_experiments_overlay_at_80_columns(app, snap_compare):
    """80 columns, `e`, two experiments marked (● on workspace and demo-scratch): the accuracy and macro_f1 columns
    right after experiment and rev, and one chart 'val/acc · 2 of 2 marked experiments' with a legend of the two."""
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("e")
        await settle(pilot)
        await pilot.press("space", "down", "down", "space")
        await settle(pilot)

    assert snap_compare(app, terminal_size=(80, 30), run_before=run_before)


def test_runs_at_80_columns(app, snap_compare):
    """80 columns, `:runs`: the runs panel fills the screen with STATE, NAME, STAGE, EPOCH, VAL, TEST, F1 and GPUS
    (ETA, duration, deployment and versions dropped); running trainings show epoch k/12 and VAL, finished pipeline and
    experiment runs VAL, TEST and F1, evaluate runs TEST and F1, train runs VAL only; the footer offers x (its experiment)."""
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press("colon", *"runs", "enter")
        await settle(pilot)

    assert snap_compare(app, terminal_size=(80, 30), run_before=run_before)
