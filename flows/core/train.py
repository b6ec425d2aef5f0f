"""The train stage's work: fine-tune a timm backbone on the decoded-once split.

``train()`` sets up a Trainer and runs it; the Trainer resumes from the last good checkpoint
of the same run (same params, data and starting weights) and writes the best model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from flows.contracts import PrepareManifest
from flows.core.devices import resolve_device
from flows.core.distributed import World, current_world, init, shutdown
from flows.core.model import check_model_name
from flows.core.params import Params
from flows.core.prepare import load_manifest
from flows.core.speed import autocast_dtype
from flows.core.trainer import Tracker, Trainer, TrainResult

log = logging.getLogger("tunedeck")
__all__ = ["Tracker", "TrainResult", "device_for", "run_folder", "run_key", "train"]
CHECKPOINT_FORMAT = 2  # bump when a checkpoint's contents change: older ones are not resumed


def run_key(params: Params, manifest: PrepareManifest) -> str:
    """What defines a run: every param but evaluate's, the data version, the starting weights."""
    spec = params.to_dict()
    spec.pop("evaluate", None)
    spec["checkpoint_format"] = CHECKPOINT_FORMAT
    spec["data_version"] = manifest.data_version
    pretrained = params.model.pretrained
    if isinstance(pretrained, str) and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        spec["pretrained_sha256"] = _file_sha256(str(Path(pretrained).resolve()), stat.st_size, stat.st_mtime_ns)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's sha256, once per process for the same file, size and time (the stage and train() both ask)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_folder(base: Path, key: str) -> Path:
    """The checkpoints folder of one run: its run key's first 16 hex digits below base."""
    return base / key[:16]


def device_for(params: Params, world: World) -> torch.device:
    """This process's device: base.device, or GPU local_rank under DDP."""
    device = resolve_device(params.base.device)
    if world.size > 1 and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def train(
    params: Params, prepared: Path, out: Path, tracker: Tracker | None = None, checkpoints: Path | None = None,
    cpu_bf16: bool | None = None,
) -> TrainResult:
    """Fine-tune params.model on the prepared split; write out/model.safetensors and model.json.

    Bad settings are refused before any heavy work. With ``checkpoints`` (a base folder) the
    run's checkpoints go to its own folder below it, named by its run key: a killed run resumes
    from there, and a run of other params or data starts a folder of its own, never touching
    another run's. cpu_bf16: the process's setting of whether the CPU has native bf16 (None: its flags say).
    """
    check_model_name(params.model.name)
    world = current_world()
    device = device_for(params, world)
    autocast_dtype(params.train.precision, device, cpu_bf16)  # refuse an unsupported precision up front
    manifest = load_manifest(prepared)
    init(world, device)
    try:
        trainer = Trainer(params, manifest, prepared, device, world, tracker, cpu_bf16=cpu_bf16)
        key = run_key(params, manifest)
        return trainer.run(out, run_folder(checkpoints, key) if checkpoints is not None else None, key)
    finally:
        shutdown(world)
