"""The train stage for real: kill -9 then `dvc repro` resumes to the same weights; 2-process DDP."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import pytest
import yaml

from tests.integration.project import checkpoint_written, env, make_project, run

pytestmark = pytest.mark.slow


def set_train(project, **values):
    raw = yaml.safe_load((project / "params.yaml").read_text())
    for key, value in values.items():
        group, _, name = key.partition("__")
        raw[group][name] = value
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def model_sha(project) -> str:
    return hashlib.sha256((project / "models" / "model.safetensors").read_bytes()).hexdigest()


def test_kill_9_then_dvc_repro_ends_bit_identical(tmp_path):
    settings = dict(train__epochs=40, train__batch_size=4, train__checkpoint_every=2, train__ema_decay=0.9,
                    train__crop_padding=2, train__hflip=0.5)
    whole = make_project(tmp_path / "whole")
    set_train(whole, **settings)
    run(whole, "dvc", "repro", "train", TUNEDECK_PREFECT="off")

    killed = make_project(tmp_path / "killed")
    set_train(killed, **settings)
    run(killed, "dvc", "repro", "prepare", TUNEDECK_PREFECT="off")
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=killed, env=env(TUNEDECK_PREFECT="off"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300  # a hang guard
    while not checkpoint_written(killed / "checkpoints"):  # the event: the first checkpoint (step 2 of 200, mid-epoch), then the kill at once
        assert time.monotonic() < deadline and proc.poll() is None, "the train stage never wrote a checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "models" / "model.safetensors").exists(), "the run finished before it was killed"

    again = run(killed, "dvc", "repro", "train", TUNEDECK_PREFECT="off")
    assert "resuming from checkpoints/" in again.stderr + again.stdout
    assert model_sha(killed) == model_sha(whole)
    for curve in ("train/loss.tsv", "val/acc.tsv"):  # the same metrics, every epoch, timings aside
        assert (killed / "dvclive/plots/metrics" / curve).read_text() == (whole / "dvclive/plots/metrics" / curve).read_text()


def test_two_process_ddp_trains_and_saves_one_model(tmp_path):
    project = make_project(tmp_path / "ddp")
    set_train(project, base__devices=2, train__epochs=2)
    run(project, "dvc", "repro", "prepare", TUNEDECK_PREFECT="off")
    proc = run(project, "python", "-m", "flows.stages.train", TUNEDECK_PREFECT="off")
    assert "launching 2 DDP processes" in proc.stderr
    assert list((project / "models").glob("*.safetensors")) == [project / "models" / "model.safetensors"]
    assert "devices=2" in proc.stderr
