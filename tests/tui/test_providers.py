"""Unit tests of the providers and pure helpers: no Textual, no server, no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flows.run.runjoin import RunJoiner
from tui.experiment_table import diff, table_columns
from tui.providers.dvc_reader import parse_exp_show
from tui.providers.fake_dvc import FakeDvc
from tui.providers.fake_gpu import FakeHost, FakeNvml
from tui.providers.models import RunQuery
from tui.providers.prefect_api import PrefectApi
from tui.providers.prefect_parse import parse_overrides, run_filter, run_parameters, schedule_text
from tui.providers.telemetry import NvmlTelemetry
from tui.query import parse_filter


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_process_lists_are_polled_at_most_every_two_seconds():
    clock, nvml = Clock(), FakeNvml()
    telemetry = NvmlTelemetry(nvml, FakeHost(), clock=clock)
    for t in (0.0, 0.5, 1.0, 1.9, 2.0, 3.9, 4.0):
        clock.now = t
        telemetry.sample()
    assert telemetry.process_polls == 3
    assert nvml.process_calls == 3 * 8


def test_a_metric_the_gpu_lacks_is_none_not_an_error():
    sample = NvmlTelemetry(FakeNvml(), FakeHost()).sample()
    assert sample.gpus[7].power_w is None and sample.gpus[0].power_w is not None
    assert sample.no_gpu is None and len(sample.gpus) == 8


def test_no_nvml_shows_cpu_and_says_there_is_no_gpu(monkeypatch, tmp_path):
    import pynvml

    def fail():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    from flows.gateways import gpus

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    gpus.reset()
    try:
        sample = NvmlTelemetry(host=FakeHost(), sys_root=tmp_path).sample()  # a host with no other GPU either
    finally:
        gpus.reset()
    assert sample.gpus == () and sample.no_gpu.startswith("No GPU:") and "CPU only" in sample.no_gpu
    assert sample.host.cpu_count == 64


def test_join_reads_live_run_files_and_skips_stale_ones(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / f"{os.getpid()}.json").write_text(json.dumps({"flow_run_id": "live-run", "name": "x", "stage": "train"}))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (runs / f"{dead.pid}.json").write_text(json.dumps({"flow_run_id": "stale-run"}))
    assert RunJoiner(runs)(os.getpid()) == "live-run"
    assert RunJoiner(runs)(dead.pid) is None


def test_join_reads_the_environment_of_worker_started_processes_and_their_children(tmp_path):
    env = {**os.environ, "PREFECT__FLOW_RUN_ID": "worker-run"}
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        import psutil

        deadline = time.monotonic() + 60  # a hang guard: the child starts in well under a second
        while not psutil.Process(parent.pid).children():
            assert time.monotonic() < deadline, "the parent never started its child"
            time.sleep(0.05)
        child = psutil.Process(parent.pid).children()[0]
        joiner = RunJoiner(tmp_path)
        assert joiner(parent.pid) == "worker-run"
        assert joiner(child.pid) == "worker-run"
        assert joiner(os.getpid()) is None
    finally:
        for proc in psutil.Process(parent.pid).children():
            proc.kill()
        parent.kill()
        parent.wait()


def test_prefect_down_is_a_sentence_not_an_exception():
    assert PrefectApi(lambda: None).snapshot(RunQuery()).error.startswith("no Prefect server is running")
    snap = PrefectApi("http://127.0.0.1:9/api", timeout=0.5).snapshot(RunQuery())
    assert not snap.connected and "does not answer" in snap.error


def test_filter_words():
    assert parse_filter("failed train") == RunQuery("train", ("FAILED",), 0, 100)
    assert parse_filter("Running") == RunQuery("", ("RUNNING",), 0, 100)
    assert run_filter(parse_filter("crashed demo")) == {"flow_runs": {"name": {"like_": "demo"}, "state": {"type": {"any_": ["CRASHED"]}}}}


def test_run_now_overrides():
    assert parse_overrides("train.lr=0.0003 train.epochs=3 model.name=resnet50") == {
        "train": {"lr": 0.0003, "epochs": 3}, "model": {"name": "resnet50"}}
    assert run_parameters(("overrides",), "train.lr=0.1") == {"overrides": ["train.lr=0.1"]}
    with pytest.raises(ValueError, match="not key=value"):
        parse_overrides("train.lr")


def test_schedules_in_words():
    assert schedule_text([{"schedule": {"cron": "0 3 * * 1"}}, {"schedule": {"interval": 86400}}]) == "cron 0 3 * * 1, every 1d"
    assert schedule_text([]) == "none"


def test_exp_show_rows_and_diff():
    data = [{"rev": "workspace", "name": None, "data": {"params": {"params.yaml": {"data": {"train": {"lr": 0.001}}}},
                                                      "metrics": {"eval/metrics.json": {"data": {"accuracy": 0.8}}}},
             "experiments": [{"name": "fast", "revs": [{"rev": "abcdef123", "name": "fast", "data": {
                 "params": {"params.yaml": {"data": {"train": {"lr": 0.01}}}},
                 "metrics": {"eval/metrics.json": {"data": {"accuracy": 0.9}}}}}]}]}]
    rows = parse_exp_show(data)
    assert [(r.name, r.rev) for r in rows] == [("workspace", ""), ("fast", "abcdef1")]
    assert table_columns(rows) == ["train.lr", "accuracy"]
    assert diff(rows[0], rows[1]) == [("train.lr", "0.001", "0.01"), ("accuracy", "0.8", "0.9")]


def test_fake_experiments_have_curves():
    assert [name for name, _, _ in FakeDvc().curves().series] == ["train/loss", "val/loss", "val/acc"]


def test_monitor_view_reads_the_monitors_events_and_the_runs_drift_started():
    """What flows.ship.monitor emits (the MonitorBatch contract) comes back as the screen's dataclasses."""
    from flows.contracts import DriftStatistic, Estimated, MonitorBatch
    from tui.providers.fake_prefect import fake_monitor
    from tui.providers.monitor_api import read_monitor

    batch = MonitorBatch(folder="new/1", model_version="v0.1.0", n_images=40, drifted=True, streak=2, triggered=True,
                         statistics=[DriftStatistic(name="psi", value=0.4, threshold=0.25, flagged=True, direction="above")],
                         estimated_accuracy={"atc": Estimated(value=0.6, low=0.5, high=0.7),
                                             "confidence": Estimated(value=0.7, low=0.6, high=0.8)},
                         priors={"a": Estimated(value=0.75, low=0.7, high=0.8), "b": Estimated(value=0.25, low=0.2, high=0.3)},
                         reference_accuracy=0.9)
    runs = [{"name": "calm-fox", "state_type": "SCHEDULED", "start_time": None, "labels": {"tunedeck.reason": "drift: psi"}},
            {"name": "other", "state_type": "COMPLETED", "start_time": None, "labels": {}}]

    def call(method, path, body):
        return {"events": [{"payload": batch.model_dump(mode="json")}, {"payload": {"not": "ours"}}]} if path == "events/filter" else runs

    view = read_monitor(call)
    assert len(view.batches) == 1 and view.batches[0].triggered and view.batches[0].statistics[0].name == "psi"
    assert view.batches[0].estimated == (0.6, 0.5, 0.7) and view.batches[0].reference_accuracy == 0.9
    assert view.batches[0].priors == (("a", 0.75), ("b", 0.25)) and view.batches[0].accuracy is None
    assert [r.name for r in view.retrains] == ["calm-fox"] and view.retrains[0].state == "Scheduled"
    fake = fake_monitor()  # the demo's fake has the same shape
    assert {s.name for s in fake.batches[-1].statistics} <= {"mmd_p", "domain_auc", "psi", "chi2_p", "confidence_drop", "accuracy_drop"}


def test_a_finished_run_s_test_scores_come_from_its_labels_beside_its_training_s_progress():
    """The evaluate stage's scores (flows.contracts.StageProgress.scores) merge into the run's labels without
    touching the epoch k/N and val metrics training left there; a stage run of its own has scores and no progress."""
    from flows.contracts import StageProgress, eval_scores
    from tui.providers.prefect_parse import run_progress, run_scores

    scores = StageProgress.scores("evaluate", eval_scores({"accuracy": 0.88, "macro_f1": 0.87, "n_test": 448}))
    assert scores.labels() == {"tunedeck.metric.test/acc": 0.88, "tunedeck.metric.test/macro_f1": 0.87}
    assert StageProgress.from_line(scores.line()) == scores, "a pipeline run reads it from the stage's stdout"
    trained = StageProgress(epoch=12, epochs=12, metrics={"val/acc": 0.9}, eta_s=0.0).labels()
    labels = {**trained, **scores.labels()}
    progress = run_progress(labels)
    assert progress.step == 11 and progress.epochs == 12 and dict(progress.metrics) == {"val/acc": 0.9}
    assert run_scores(labels) == (("test/acc", 0.88), ("test/macro_f1", 0.87))
    assert run_progress(scores.labels()) is None and run_scores(scores.labels()) == run_scores(labels)


def test_the_registry_line_shows_prods_worst_group_and_gap_when_the_data_has_groups():
    from tui.providers.models import Experiment, Registry
    from tui.screens.experiments import registry_line

    registry = Registry("v0.2.0", (("v0.1.0", "a" * 40), ("v0.2.0", "b" * 40)))
    rows = (Experiment("exp-1", "a" * 7, (), (("accuracy", 0.9),)),
            Experiment("exp-2", "b" * 7, (), (("accuracy", 0.95), ("site.worst_accuracy", 0.632), ("site.gap", 0.339),
                                               ("camera.worst_accuracy", 0.81))))
    line = registry_line(registry, rows).splitlines()[0]
    assert line == ("model registry: prod [b]v0.2.0[/b] (worst camera group 0.810; worst site group 0.632, gap 0.339) "
                    "· versions v0.1.0, v0.2.0"), line
    assert registry_line(registry, rows[:1]).splitlines()[0] == "model registry: prod [b]v0.2.0[/b] · versions v0.1.0, v0.2.0"


def test_a_runs_energy_and_cost_come_from_its_labels_and_unknown_is_never_zero():
    from tui.format import cost, energy
    from tui.providers.models import Run
    from tui.providers.prefect_parse import run_cost

    labels = {"tunedeck.energy.gpu_wh": 12.5, "tunedeck.energy.cpu_wh": "unknown", "tunedeck.cost.total": 0.0042,
              "tunedeck.cost.device_hours": 0.5, "tunedeck.host": "box", "tunedeck.metric.test/acc": 0.9}
    found = run_cost(labels)
    assert found == (("cost/device_hours", 0.5), ("cost/total", 0.0042), ("energy/cpu_wh", "unknown"), ("energy/gpu_wh", 12.5))
    run = Run("id", "name", "pipeline", "COMPLETED", "Completed", None, None, cost=found)
    assert (energy(run), cost(run)) == ("≥12.5", "<0.01"), "the known part, marked as a lower bound"
    unread = Run("id", "name", "pipeline", "COMPLETED", "Completed", None, None, cost=(("energy/cpu_wh", "unknown"),))
    assert (energy(unread), cost(unread)) == ("unknown", ""), "an unread counter is unknown, and no price is no cost"
    both = (("cost/total", 1234.5), ("energy/cpu_wh", 40.0), ("energy/gpu_wh", 310.0))
    assert (energy(Run("i", "n", "p", "COMPLETED", "", None, None, cost=both)),
            cost(Run("i", "n", "p", "COMPLETED", "", None, None, cost=both))) == ("350", "1234")
    assert energy(Run("i", "n", "p", "RUNNING", "", None, None)) == "", "blank before it trained"
