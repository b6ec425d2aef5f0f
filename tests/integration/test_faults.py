"""Faults users meet, through a real server and worker: the server restarted under a training run, and a double
"run now" of the same deployment with the same overrides."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

from flows.host import server
from tests.integration.cluster import Cluster, cluster
from tests.integration.project import FINAL, api, checkpoint_written, wait
from tests.integration.test_deployments import _process_tree, logs, start

# a hang guard per test (the project's default is 600 s): each starts a server and a worker and runs two or three
# pipelines; the medians measured are in the commit message
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
OUTAGE_S = 25  # how long the server stays down: the scenario itself (an upgrade, a crash and a restart)


def model_sha256(url: str, run_id: str) -> str:
    """The model sha256 the run recorded in its versions artifact."""
    artifacts = api(url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    versions = next(a["data"] for a in artifacts if a["key"] == "versions")
    return re.search(r"\| model_sha256 \| *([0-9a-f]{64}) *\|", versions).group(1)


def wait_for_checkpoint(c: Cluster, run_id: str) -> None:
    """The event: the run's first checkpoint on disk (it is then in its train stage)."""
    deadline = time.monotonic() + 600  # a hang guard (the median is in the module's report)
    while not checkpoint_written(c.project / "checkpoints"):
        assert time.monotonic() < deadline and c.worker.poll() is None, ("no checkpoint", wait(c.url, run_id, 1))
        time.sleep(0.1)


def stage_processes(run_id: str) -> list[psutil.Process]:
    """Every process below the run's flow-run process (DVC, the stage, the warm stage child that trains).

    The flow-run process itself, which holds the GPU slot's lease, is left out.
    """
    tree = _process_tree(run_id)
    return tree[1:]


def signal_all(processes: list[psutil.Process], signum: int) -> None:
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signum)


def test_a_server_restart_under_a_training_run_keeps_the_run_and_its_worker(tmp_path):
    """kill -9 of the server while a run trains on the worker's only GPU, back OUTAGE_S later: the run ends
    Completed with its model tag, and the same worker then takes and completes the next run.

    The stages are paused (SIGSTOP) through the outage and resumed once the server answers, so the train stage
    is running when the server dies and still running when it returns, on any machine however fast; the
    flow-run process, which holds the GPU slot's lease, is not paused: its lease meets the outage.
    """
    with cluster(tmp_path, gpus=1) as c:
        run_id = start(c.url, "pipeline", overrides=["train.epochs=20"], pull=False, push=False, promote=False)
        wait_for_checkpoint(c, run_id)
        stages = stage_processes(run_id)
        assert any("flows.stages.train" in " ".join(p.cmdline()) for p in stages), "the train stage is not running"
        signal_all(stages, signal.SIGSTOP)
        os.kill(json.loads((c.project / ".tunedeck" / "server.json").read_text())["pid"], signal.SIGKILL)
        try:
            time.sleep(OUTAGE_S)  # the scenario: the server is down this long, nothing to wait on
            assert server.start(c.port, root=c.project) == c.url
        finally:
            signal_all(stages, signal.SIGCONT)
        done = wait(c.url, run_id, timeout=900)  # a hang guard
        assert done["state_type"] == "COMPLETED", (done["state"], logs(c.url, run_id)[-3000:])
        assert any(t.startswith("model:") for t in done["tags"]), done["tags"]
        # said on the worker's output: the run's later log lines may never reach a server that was restarted
        # (Prefect's log shipper lost them in one CI run of two), the worker's own stream keeps every one
        said = c.log.read_text()
        assert "the server was unreachable for" in said, "the slot's outage was not said"
        assert c.worker.poll() is None, "the worker did not outlive the outage"
        after = wait(c.url, start(c.url, "pipeline", overrides=["train.epochs=2"], pull=False, push=False, promote=False), timeout=900)
        assert after["state_type"] == "COMPLETED", (after["state"], logs(c.url, after["id"])[-3000:])
        assert c.worker.poll() is None, "the next run needed a new worker"


def test_a_double_run_now_completes_both_with_the_model_of_a_solo_run(tmp_path):
    """The same deployment started twice at once with the same overrides, on a worker's two GPU slots: both
    Completed, each model's sha256 equal to that of a solo run with the same overrides (CPU training is
    deterministic, so any difference is the two runs meeting: a shared checkpoint, output or lock)."""
    overrides = ["train.epochs=10"]
    with cluster(tmp_path, gpus=2) as c:
        solo = wait(c.url, start(c.url, "pipeline", overrides=overrides, pull=False, push=False, promote=False), timeout=900)
        assert solo["state_type"] == "COMPLETED", (solo["state"], logs(c.url, solo["id"])[-3000:])
        forget_trained(c.project)
        pair = [start(c.url, "pipeline", overrides=overrides, pull=False, push=False, promote=False) for _ in range(2)]
        train_together(c, pair)
        done = [wait(c.url, run_id, timeout=900) for run_id in pair]  # a hang guard
        for flow_run in done:
            assert flow_run["state_type"] == "COMPLETED", (flow_run["state"], logs(c.url, flow_run["id"])[-3000:])
        assert {f["labels"].get("tunedeck.gpus") for f in done} == {"0", "1"}, "the two runs did not take both slots"
        expected = model_sha256(c.url, solo["id"])
        assert [model_sha256(c.url, run_id) for run_id in pair] == [expected, expected]


def training(run_id: str) -> list[psutil.Process]:
    """The run's stage processes while its train stage runs; [] otherwise."""
    stages = stage_processes(run_id)
    with contextlib.suppress(psutil.Error):
        if any("flows.stages.train" in " ".join(p.cmdline()) for p in stages):
            return stages
    return []


def train_together(c: Cluster, pair: list[str]) -> None:
    """Make the two runs' train stages overlap, however the worker staggers their starts and however fast the
    machine: the first to train is paused (SIGSTOP) until the second trains too, then resumed."""
    deadline = time.monotonic() + 600  # a hang guard: both runs reach their train stage (the events)
    while not (first := next((r for r in pair if training(r)), None)):
        assert time.monotonic() < deadline, "no run reached its train stage"
        time.sleep(0.05)
    other = next(r for r in pair if r != first)
    stages = training(first)
    signal_all(stages, signal.SIGSTOP)
    try:
        while not training(other):
            flow_run = api(c.url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [other]}}})[0]
            assert flow_run["labels"].get("tunedeck.stage") not in ("evaluate", "export"), "its train ended unseen"
            assert time.monotonic() < deadline and flow_run["state_type"] not in FINAL, ("no overlap", flow_run["state"])
            time.sleep(0.05)
    finally:
        signal_all(stages, signal.SIGCONT)


def forget_trained(project: Path) -> None:
    """Remove what lets a run skip training (its checkpoints here and on the DVC remote, DVC's run cache), so the
    pair trains from scratch, at once, on the same run key."""
    for folder in ("checkpoints", ".dvc/cache/runs", "dvc-remote/tunedeck/checkpoints"):
        shutil.rmtree(project / folder, ignore_errors=True)
