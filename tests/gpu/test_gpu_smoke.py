"""What only a CUDA machine can show, each through the project's own code (bench/gpu_check.sh runs this).

- resnet18 (random init: no hub here) trains 2 epochs in bf16 autocast on a GPU, with finite weights;
- NVML (flows.gateways.gpus, the one gateway) lists the training process, and the run joiner (flows.run.runjoin)
  names its flow run from the PREFECT__FLOW_RUN_ID a worker starts it with: the join the dashboard
  and the worker's telemetry make;
- with 2 GPUs, 2 ranks of NCCL DDP at batch 3 train the weights 1 rank does at batch 6.

Off a CUDA machine each test skips (the one skip the suite allows: `make test` deselects the `gpu`
marker, so CI never meets it). TUNEDECK_SMOKE_DEVICE=cpu runs the same bodies on the CPU instead
(gloo, and a stand-in NVML that lists the training process), to check the tests where no GPU is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.core.params import parse_params
from flows.core.prepare import prepare
from flows.gateways import gpus
from flows.run.runjoin import RunJoiner
from tests.conftest import ROOT, tiny_params_dict, write_images

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]  # the timeout is a hang guard: each test takes under a minute
RUN_ID = "0f1e2d3c-4b5a-4968-8776-655443322110"
TRAIN = '''
import json, sys
from pathlib import Path

import torch

from flows.core.distributed import current_world
from flows.core.params import parse_params
from flows.core.train import train

# fp32 means fp32 here: TF32 convolutions and matmuls would round to ~1e-3 and hide what the DDP test compares
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
raw, prepared, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), Path(sys.argv[3])
result = train(parse_params(raw), prepared, out)
if current_world().main:
    print(json.dumps({"precision": result.precision, "epochs_run": result.epochs_run}), flush=True)
if "--hold" in sys.argv:
    sys.stdin.read()  # keep the CUDA context, as NVML sees it, until the test has looked
'''
# Two ranks at batch 3 see the same global batches as one at batch 6 (the trainer deals each global batch
# out by rank); test_vit has no BatchNorm, and SGD in fp32 (TF32 off) leaves the rounding of averaging
# two batch means instead of one, and cuBLAS's reduction order for another batch size: measured 1.2e-7
# on CPU (test_multinode.py), 1e-4 on a GPU keeps a wide margin; a rank training on the wrong shard, or
# gradients not all-reduced, moves weights by lr x gradient, orders above it.
DDP_TOLERANCE = 1e-4


class ListingNvml(gpus.StandInNvml):
    """One stand-in GPU whose compute processes are the given pids (the CPU check of the NVML join)."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(1)
        self.pids = pids

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list:  # noqa: N802 - pynvml's name
        return [type("Process", (), {"pid": pid, "usedGpuMemory": 512 * gpus.MIB})() for pid in self.pids]


def smoke_device() -> str:
    """cuda, or cpu when TUNEDECK_SMOKE_DEVICE=cpu asks for the CPU check; else the test skips."""
    device = os.environ.get("TUNEDECK_SMOKE_DEVICE", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (bench/gpu_check.sh runs it on one; TUNEDECK_SMOKE_DEVICE=cpu checks it here)")
    return device


def params_for(tmp_path: Path, device: str, **train: object) -> dict:
    """The project's params.yaml on 3 classes of 16 small images, on device, with train's settings."""
    raw = tiny_params_dict(str(write_images(tmp_path / "images", {"cat": 16, "dog": 16, "fox": 16})))
    raw["base"]["device"] = device
    model = train.pop("model")
    raw["model"].update(name=model, pretrained=False)
    raw["data"]["image_size"] = train.pop("image_size")
    raw["train"].update(train)
    return raw


def prepared(tmp_path: Path, raw: dict) -> Path:
    """The decoded-once split of raw's images (the prepare stage's work)."""
    prepare(parse_params(raw), tmp_path / "prepared")
    return tmp_path / "prepared"


def trainer(raw: dict, data: Path, out: Path, ranks: int = 1, hold: bool = False, **env: str) -> subprocess.Popen:
    """train() of raw in a process of its own (torchrun with ranks > 1), its result line on stdout."""
    out.mkdir(parents=True)
    (out / "params.json").write_text(json.dumps(raw))
    (out / "train.py").write_text(TRAIN)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 \
        else [sys.executable]
    command = [*launcher, str(out / "train.py"), str(out / "params.json"), str(data), str(out), *(["--hold"] if hold else [])]
    return subprocess.Popen(command, cwd=out, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                                 **env})


def result_of(proc: subprocess.Popen) -> dict:
    """The trainer's result line (it blocks until training is done; the module's timeout guards a hang)."""
    line = proc.stdout.readline()
    assert line, f"the trainer ended without a result (exit {proc.wait()})"
    return json.loads(line)


def joined(nvml, pid: int) -> set[tuple[int, str | None]]:
    """(pid, flow run id) of every compute process NVML lists on any GPU, joined as the dashboard joins them."""
    joiner = RunJoiner(Path("no-run-files"))  # the worker's environment variable, not a stage's run file
    return {(p, run) for i in range(gpus.count(nvml)) for p, _, run in gpus.gpu_processes(nvml, i, joiner) if p == pid}


def test_resnet18_trains_two_epochs_in_bf16_and_nvml_joins_its_process_to_its_run(tmp_path):
    device = smoke_device()
    raw = params_for(tmp_path, device, model="resnet18", image_size=32, precision="bf16", epochs=2, batch_size=8)
    proc = trainer(raw, prepared(tmp_path, raw), tmp_path / "out", hold=True, PREFECT__FLOW_RUN_ID=RUN_ID)
    try:
        result = result_of(proc)
        assert result == {"precision": "bf16", "epochs_run": 2}, result
        weights = load_file(str(tmp_path / "out" / "model.safetensors"))
        assert weights and all(torch.isfinite(w.float()).all() for w in weights.values()), "non-finite weights"
        nvml = gpus.load_nvml()[0] if device == "cuda" else ListingNvml([proc.pid])
        assert nvml is not None, gpus.load_nvml()[1]
        assert joined(nvml, proc.pid) == {(proc.pid, RUN_ID)}, "NVML must list the training process, joined to its run"
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)  # a hang guard: it exits once stdin closes


def test_two_rank_nccl_ddp_trains_the_weights_one_rank_does(tmp_path):
    device = smoke_device()
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs, this machine has {torch.cuda.device_count()}")
    raw = params_for(tmp_path, device, model="test_vit", image_size=16, precision="fp32", optimizer="sgd", lr=0.05,
                     hflip=0.0, epochs=2)
    data = prepared(tmp_path, raw)
    one = trainer({**raw, "train": {**raw["train"], "batch_size": 6}}, data, tmp_path / "one")
    two = trainer({**raw, "train": {**raw["train"], "batch_size": 3}}, data, tmp_path / "two", ranks=2)
    assert result_of(one)["epochs_run"] == result_of(two)["epochs_run"] == 2
    assert one.wait(timeout=60) == two.wait(timeout=60) == 0  # a hang guard: both have printed their result
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    print(f"\n2 ranks ({device}) against 1: the largest weight difference is {worst:.2e}")
    assert worst <= DDP_TOLERANCE, worst
