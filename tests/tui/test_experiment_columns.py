"""Which columns the experiments view shows: metrics first, then only the params that differ."""

from __future__ import annotations

from tui.experiment_table import columns, pick_metric, table_rows
from tui.providers.models import Experiment

ROWS = (Experiment("a", "1111111", (("train.lr", "0.1"), ("train.epochs", "4")), (("acc", 0.9), ("loss", 0.2))),
        Experiment("b", "2222222", (("train.lr", "0.01"), ("train.epochs", "4")), (("acc", 0.85),)),
        Experiment("c", "3333333", (("train.lr", "0.01"), ("train.epochs", "4"), ("model.name", "resnet18")), (("acc", 10.0),)))


def test_metrics_first_then_changed_params_only():
    assert columns(ROWS) == ["acc", "loss", "train.lr", "model.name"], "a param only one row has counts as changed"
    assert columns(ROWS, all_params=True) == ["acc", "loss", "train.lr", "train.epochs", "model.name"]


def test_a_metric_sorts_numerically_with_missing_values_last():
    assert [i for i, _ in table_rows(ROWS, columns(ROWS), "acc")] == [1, 0, 2], "10.0 sorts after 0.9, not before"
    assert [i for i, _ in table_rows(ROWS, columns(ROWS), "loss")] == [0, 1, 2]


def test_the_overlaid_metric_defaults_to_val_acc():
    assert pick_metric(("train/loss", "val/acc"), None) == "val/acc"
    assert pick_metric(("train/loss", "val/acc"), "train/loss") == "train/loss"
    assert pick_metric(("lr",), "val/acc") == "lr" and pick_metric((), None) is None
