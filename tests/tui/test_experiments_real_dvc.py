"""The experiments view on a real DVC repo: metrics before params, equal params hidden, marked curves overlaid."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from textual.widgets import DataTable

from tests.tui.conftest import settle
from tui.app import make_app
from tui.providers import demo_providers
from tui.providers.dvc_reader import DvcReader
from tui.screens.experiments import ExperimentsScreen

pytestmark = pytest.mark.anyio

DVC = str(Path(sys.executable).with_name("dvc"))

# A stage that turns params into a metrics file and dvclive-shaped curves (committed: cache false).
STAGE = '''
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))["train"]
os.makedirs("dvclive/plots/metrics/val", exist_ok=True)
acc = [round(1 - 1 / (1 + p["lr"] * 10 * (i + 1)), 4) for i in range(p["epochs"])]
with open("dvclive/plots/metrics/val/acc.tsv", "w") as f:
    f.write("step\\tacc\\n" + "".join(f"{i}\\t{a}\\n" for i, a in enumerate(acc)))
json.dump({"acc": acc[-1], "loss": round(1 - acc[-1], 4)}, open("metrics.json", "w"))
'''
DVC_YAML = f'''stages:
  train:
    cmd: {sys.executable} stage.py
    deps: [stage.py]
    params: [train]
    metrics:
      - metrics.json:
          cache: false
    plots:
      - dvclive/plots/metrics:
          x: step
          cache: false
'''


def _run(root: Path, *cmd: str) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(cmd, cwd=root, check=True, capture_output=True, env=env, timeout=60)


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    """A git + DVC repo with a baseline commit and three experiments that differ only in train.lr."""
    root = tmp_path_factory.mktemp("exp-repo")
    _run(root, "git", "init", "-q")
    _run(root, DVC, "init", "-q")
    (root / "stage.py").write_text(STAGE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text("train:\n  lr: 0.01\n  epochs: 4\n")
    _run(root, DVC, "repro", "-q")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "baseline")
    for name, lr in (("slow", "0.02"), ("mid", "0.1"), ("fast", "0.5")):
        _run(root, DVC, "exp", "run", "-q", "-n", name, "-S", f"train.lr={lr}")
    return root


def _app(root: Path):
    providers = dataclasses.replace(demo_providers(runs=20, animate=False), experiments=DvcReader(root))
    return make_app(providers=providers, refresh_s=3600)


def _headers(table: DataTable) -> list[str]:
    return [str(c.label) for c in table.columns.values()]


async def test_metrics_come_first_and_equal_params_hide_until_a(dvc_repo: Path):
    app = _app(dvc_repo)
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        await pilot.press("e")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ExperimentsScreen)
        table = screen.query_one("#exp-table", DataTable)
        assert table.row_count >= 4, "the workspace, the baseline and three experiments"
        assert _headers(table) == ["", "experiment", "rev", "acc", "loss", "train.lr"], "train.epochs is 4 in every row"
        await pilot.press("a")
        assert _headers(table) == ["", "experiment", "rev", "acc", "loss", "train.lr", "train.epochs"]
        await pilot.press("a")
        assert "train.epochs" not in _headers(table)


async def test_sorting_by_a_metric_is_numeric(dvc_repo: Path):
    app = _app(dvc_repo)
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        await pilot.press("e")
        await settle(pilot)
        table = app.screen.query_one("#exp-table", DataTable)
        table.move_cursor(column=_headers(table).index("loss"))
        await pilot.press("s")
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        losses = [float(row[4]) for row in rows if "▶" not in row[0]]
        assert len(losses) >= 4 and losses == sorted(losses)
        assert all(row[4] == "—" for row in rows[len(losses):]), "running runs' unsaved experiments (no metrics yet) last"


async def test_marked_experiments_overlay_one_series_each(dvc_repo: Path):
    app = _app(dvc_repo)
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        await pilot.press("e")
        await settle(pilot)
        screen = app.screen
        table = screen.query_one("#exp-table", DataTable)
        names = [table.get_row_at(i)[1] for i in range(table.row_count)]
        for name in ("fast", "slow"):
            table.move_cursor(row=names.index(name))
            await pilot.press("space")
            await settle(pilot)
        assert screen.curve_metric == "val/acc"
        assert [label.split()[0] for label, _, _ in screen.overlay] == ["fast", "slow"]
        fast, slow = (values for _, _, values in screen.overlay)
        assert len(fast) == len(slow) == 4 and fast[-1] > slow[-1], "each series is its own experiment's curve"
        assert screen.query_one("#curves-overlay").display


async def test_c_cycles_the_overlaid_metric_and_unmarking_brings_back_the_workspace_curves(app):
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        await pilot.press("e")
        await settle(pilot)
        screen = app.screen
        await pilot.press("c")
        assert screen.overlay == [], "c with nothing marked only says to mark first"
        await pilot.press("space", "down", "space")
        await settle(pilot)
        assert screen.curve_metric == "val/acc" and len(screen.overlay) == 2
        await pilot.press("c")
        await settle(pilot)
        assert screen.curve_metric == "val/loss" and len(screen.overlay) == 2
        await pilot.press("space", "up", "space")
        await settle(pilot)
        assert screen.overlay == [] and screen.query_one("#curves-loss").display
        assert not screen.query_one("#curves-overlay").display
