"""The train stage for real: kill -9 then `dvc repro` resumes to the same weights; 2-process DDP equals 1 process."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import pytest
import yaml
from safetensors.torch import load_file

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


DDP_SETTINGS = dict(model__name="test_vit", train__optimizer="sgd", train__precision="fp32", train__hflip=0.0,
                    train__crop_padding=0, train__lr=0.05, train__epochs=2, train__freeze_epochs=1)
"""As tests/integration/test_multinode.py: no BatchNorm (the Trainer keeps per-rank BatchNorm statistics,
there is no SyncBatchNorm), no augmentation drawn per rank, fp32, SGD. One epoch with the backbone frozen,
then all of it: DDP is wrapped again at that change (only then), and a wrap that missed the unfrozen
parameters would leave them unsynchronised between the ranks, far from the one process's weights."""


def trained(project, **values) -> dict:
    """The weights the train stage writes with these params (run directly: `dvc repro` would skip a rerun)."""
    set_train(project, **values)
    run(project, "python", "-m", "flows.stages.train", TUNEDECK_PREFECT="off")
    return load_file(str(project / "models" / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_process_ddp_equals_one_process_at_the_global_batch(tmp_path):
    """Two gloo processes at batch 3 train the weights one process trains at batch 6.

    The Trainer deals each epoch's order out by rank (rank r takes every other image of it), so the
    ranks' batches k together are one process's batch k of 6, and DDP's gradient is the mean of the
    two batch means, the one process's batch mean up to fp32 rounding. Six steps of timm's sgd
    (Nesterov momentum, weight decay 0.05) at lr 0.05 carry that rounding (~1e-7 of a gradient) to
    ~1e-7 on the weights (measured: 1.2e-7, one fp32 ulp at 1.0): tolerance 1e-5, as the two-node test. One process at batch 3 (what a DDP launch that silently ran one rank would train)
    lands far outside it.
    """
    project = make_project(tmp_path / "ddp")
    set_train(project, **DDP_SETTINGS)
    run(project, "dvc", "repro", "prepare", TUNEDECK_PREFECT="off")
    two = trained(project, base__devices=2, train__batch_size=3)
    assert list((project / "models").glob("*.safetensors")) == [project / "models" / "model.safetensors"]  # rank 0's only
    one = trained(project, base__devices=1, train__batch_size=6)
    half = trained(project, base__devices=1, train__batch_size=3)
    worst, apart = max_difference(two, one), max_difference(two, half)
    print(f"\n2 processes x 3 vs 1 x 6: max |difference| {worst:.2e}; vs 1 x 3: {apart:.2e}")
    assert worst <= 1e-5, worst
    assert apart >= 100 * 1e-5, apart
