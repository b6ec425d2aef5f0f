"""``python -m flows.stages.train``: fine-tune the backbone, log with dvclive, write the model."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from flows.contracts import ModelCard
from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.core.params import Params
from flows.core.paths import MODELS, PREPARED, THROUGHPUT, TRAIN_LIVE, WEIGHTS, checkpoints_base
from flows.gateways import processes
from flows.stages.entry import finish, run_main


def work(params: Params, settings: Settings) -> dict:
    """Train with dvclive logging every epoch's metrics (plots under dvclive/plots).

    With base.devices > 1 this process launches torchrun, whose workers train with DDP.
    """
    from flows.core.distributed import current_world
    from flows.core.train import train
    from flows.gateways.power import EnergyMeter

    warn_if_untracked_weights(params)
    mirror = checkpoint_mirror(params, settings)
    meter = EnergyMeter.for_host() if "RANK" not in os.environ else None  # the stage's process measures, not a rank
    if (params.base.devices > 1 or params.base.nodes > 1) and "RANK" not in os.environ:
        summary = launch_ddp(params, settings)
        devices = [f"cuda:{i}" for i in range(params.base.devices)] if params.base.device != "cpu" else ["cpu"]
        return {**summary, **record_energy(meter, devices, settings)}
    tracker = LiveTracker(params.train.epochs, settings, mirror)
    try:
        result = train(params, PREPARED, MODELS, tracker, checkpoints_base(settings.checkpoints), settings.cpu_bf16)
    finally:
        tracker.close()
    if current_world().rank:
        return {}
    return {
        **record_energy(meter, [result.device], settings, result),
        "model_sha256": result.model_sha256,
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "weights_from": result.weights_from,
        "seconds": round(result.seconds, 1),
        "epochs_run": result.epochs_run,
        "resumed_at": result.resumed_at,
        "oom_events": result.oom_events,
        "precision": result.precision,
        "precision_reason": result.precision_reason,
    }


def record_energy(meter, devices: list[str], settings: Settings, result=None) -> dict:
    """The training's energy, device-hours and cost (flows.gateways.power) added to dvclive/metrics.json, so
    `dvc exp show` has them beside the accuracy, and returned for the stage's summary; its throughput (what
    `tunedeck plan` predicts from) in THROUGHPUT, for the run's labels."""
    import json

    from flows.core.atomic import replace_atomically
    from flows.gateways.gpus import index_by_uuid
    from flows.gateways.power import cpu_share

    if meter is None:
        return {}
    cuda = [d for d in devices if d.startswith("cuda")]
    used: list[int] | None = []
    if cuda:
        import torch

        used = [index_by_uuid(str(torch.cuda.get_device_properties(torch.device(d)).uuid)) for d in cuda]
        used = None if None in used else used  # a device NVML cannot name: its energy is unknown
    energy = meter.stop(used, held=len(cuda), cpu_share=1.0 if cuda else cpu_share())
    metrics = energy.metrics(settings.price_per_hour)
    measured = throughput(result, energy.seconds, devices)
    THROUGHPUT.unlink(missing_ok=True)
    if measured:
        THROUGHPUT.parent.mkdir(exist_ok=True)
        replace_atomically(THROUGHPUT, lambda tmp: tmp.write_text(json.dumps(measured, indent=4) + "\n"))
    path = TRAIN_LIVE / "metrics.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = {}
    for key, value in metrics.items():  # nested by "/", as dvclive writes its own
        group, name = key.split("/")
        summary.setdefault(group, {})[name] = value
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=4) + "\n"))
    return metrics


def throughput(result, wall_s: float, devices: list[str]) -> dict:
    """The seconds per training image and epoch on this device, the rest of the stage's time (building the model,
    loading the data) and the device: what `tunedeck plan` predicts a run's time from (flows.host.plan). None for
    a resumed training (its time covers only some of its epochs) or a DDP one (recorded later)."""
    from flows.core.prepare import load_manifest
    from flows.gateways.power import device_name

    if result is None or result.resumed_at or not result.epochs_run:
        return {}
    try:
        images = load_manifest(PREPARED).counts.get("train", 0)
    except TunedeckError:
        return {}
    if not images:
        return {}
    return {"device": device_name(devices), "images": images, "epochs": result.epochs_run,
            "s_per_image_epoch": round(result.seconds / (result.epochs_run * images), 9),
            "overhead_s": round(max(0.0, wall_s - result.seconds), 2)}


class LiveTracker:
    """Per-epoch metrics into dvclive (dvclive/metrics.json and dvclive/plots), system metrics too.

    Each epoch trained here is also reported as the stage's progress (epoch k/N, metrics, ETA)
    to its flow run, so the dashboard of any host sees it through the Prefect server.
    """

    def __init__(self, epochs: int, settings: Settings, mirror=None) -> None:
        self.live = None
        self.epochs, self.settings = epochs, settings
        self.mirror = mirror
        self.first_epoch = 0
        self.started = time.monotonic()

    def start(self, resumed: bool, first_epoch: int = 0) -> None:
        """Open dvclive afresh: on resume the trainer logs the finished epochs again first."""
        from dvclive import Live

        from flows.gateways import gpus

        self.live = Live(
            dir=str(TRAIN_LIVE), resume=False, dvcyaml=None, save_dvc_exp=False, report=None, monitor_system=gpus.present()
        )
        self.first_epoch, self.started = first_epoch, time.monotonic()

    def describe(self, facts: dict) -> None:
        """How the run trains (precision and why, compile): in dvclive/metrics.json beside the numbers, and its params."""
        self.live.summary.update(facts)
        self.live.log_params(facts)

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics at step = epoch; an epoch trained now (not replayed on resume) is reported."""
        self.live.step = epoch
        for key, value in metrics.items():
            self.live.log_metric(key, value)
        self.live.next_step()
        if epoch >= self.first_epoch:
            from flows.stages.orchestration import report_progress

            report_progress(self.progress(epoch, metrics), self.settings)

    def progress(self, epoch: int, metrics: dict[str, float]):
        """Epoch k/N, the metrics that matter while watching, and the time left at this run's pace (StageProgress)."""
        from flows.contracts import StageProgress

        trained = epoch + 1 - self.first_epoch
        per_epoch = (time.monotonic() - self.started) / max(trained, 1)
        keep = {k: v for k, v in metrics.items() if k in WATCHED}
        return StageProgress(epoch=epoch + 1, epochs=self.epochs, metrics=keep,
                             eta_s=max(0, self.epochs - epoch - 1) * per_epoch)

    def before_resume(self) -> None:
        """The trainer is about to look for a checkpoint: let the fetch from the DVC remote finish first."""
        if self.mirror is not None:
            self.mirror.wait_fetched()

    def checkpointed(self, path: Path, epoch: int) -> None:
        """An epoch's checkpoint is on disk: copy it to the DVC remote (in the background)."""
        if self.mirror is not None:
            self.mirror.push(path, epoch)

    def close(self) -> None:
        """Flush and stop dvclive's system monitor; wait for the last checkpoint's upload."""
        if self.live is not None:
            self.live.end()
        if self.mirror is not None:
            self.mirror.close()


def checkpoint_mirror(params: Params, settings: Settings):
    """The run's checkpoints on the DVC remote (flows.gateways.dvc.remote); fetched first when this host has none.

    Only the stage process fetches (before torchrun starts DDP workers); rank 0 pushes.
    """
    from flows.core.prepare import load_manifest
    from flows.core.train import run_folder, run_key
    from flows.gateways.dvc.remote import CheckpointMirror

    try:
        key = run_key(params, load_manifest(PREPARED))
    except TunedeckError:
        return None  # no prepared data: train() says so in one sentence
    mirror = CheckpointMirror(Path.cwd(), key[:16], settings.checkpoint_remote is not False)
    if "RANK" in os.environ:
        return mirror
    if params.base.devices > 1 or params.base.nodes > 1:
        mirror.fetch(run_folder(checkpoints_base(settings.checkpoints), key))  # before torchrun starts the workers that read it
    else:
        mirror.fetch_soon(run_folder(checkpoints_base(settings.checkpoints), key))  # while the model is built
    return mirror


WATCHED = ("train/loss", "val/acc", "val/loss", "val/acc_ema", "samples_per_s")
"""The metrics a run's progress carries (the dashboard's columns and detail view)."""


def launch_ddp(params: Params, settings: Settings) -> dict:
    """Run this stage under torchrun on base.devices processes; its summary comes from model.json."""

    import torch

    from flows.core.devices import resolve_device
    from flows.core.model import check_model_name
    from flows.core.speed import autocast_dtype

    check_model_name(params.model.name)  # refuse bad input here, not in n tracebacks
    autocast_dtype(params.train.precision, resolve_device(params.base.device), settings.cpu_bf16)
    n = params.base.devices
    if params.base.device.startswith("xpu"):
        raise TunedeckError(f"base.devices is {n} on Intel GPUs (xpu), and DDP over them is not supported yet: set "
                            "base.devices: 1, or train on CUDA GPUs or CPU processes.")
    if params.base.device != "cpu" and torch.cuda.is_available() and n > torch.cuda.device_count():
        raise TunedeckError(
            f"base.devices is {n} but only {torch.cuda.device_count()} CUDA GPU(s) are visible: lower it or free GPUs."
        )
    if params.base.device != "cpu" and not torch.cuda.is_available():
        raise TunedeckError(f"base.devices is {n} but there is no CUDA GPU here: set base.device: cpu to use CPU processes.")
    env = {**os.environ, **settings.but(prefect="off").env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    placement = node_placement(params, settings, env)
    where = ["--standalone", f"--nproc_per_node={n}"] if placement is None else placement.torchrun_args(n, settings.ddp_join_s)
    torchrun = ["-m", "torch.distributed.run", *where, "-m", "flows.stages.train"]
    on = "" if placement is None else f" on node {placement.node_rank} of {placement.nodes} (rendezvous {placement.master})"
    logging.getLogger("tunedeck").info("train: launching %d DDP processes with torchrun%s", n, on)
    if processes.run([sys.executable, *torchrun], tie=True, env=env) != 0:  # a killed stage stops torchrun too
        raise TunedeckError(f"the {n} DDP training processes{on} failed: see their output above.")
    if placement is not None and placement.node_rank:
        return {"node_rank": placement.node_rank, "nodes": placement.nodes, "devices": n}  # node 0 writes the model
    card = ModelCard.read(MODELS)
    return {"model_sha256": card.sha256, "best_epoch": card.best_epoch, "val_accuracy": card.val_accuracy, "devices": n,
            "nodes": params.base.nodes}


def node_placement(params: Params, settings: Settings, env: dict[str, str]):
    """This host's place in a run over base.nodes hosts (None for one host); gloo told (in env) which interface to
    use."""
    from flows.contracts.placement import Placement
    from flows.core.distributed import interface_of

    if params.base.nodes == 1:
        return None
    placement = Placement.from_settings(settings)
    if placement is None or placement.nodes != params.base.nodes:
        raise TunedeckError(
            f"base.nodes is {params.base.nodes}, but this train stage was not placed on that many hosts: run it from "
            "the pipeline deployment (it places the other nodes), or set base.nodes: 1 for `dvc repro`."
        )
    address = placement.master.rsplit(":", 1)[0] if placement.node_rank == 0 else settings.node_addr
    iface = interface_of(address) if address else None
    if iface and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = iface
    return placement


def warn_if_untracked_weights(params: Params) -> None:
    """A weights file outside weights/ is not a DVC dependency: say so, once."""
    spec = params.model.pretrained
    if isinstance(spec, str) and not Path(spec).resolve().is_relative_to(WEIGHTS.resolve()):
        logging.getLogger("tunedeck").warning(
            "train: model.pretrained '%s' lies outside %s/, so DVC cannot see when it changes; move it there.", spec, WEIGHTS
        )


def tags() -> list[str]:
    """The data version this run trains on, as a tag."""
    from flows.core.prepare import load_manifest

    try:
        return [f"data:{load_manifest(PREPARED).data_version[:12]}"]
    except TunedeckError:
        return []


def die_with_agent() -> None:
    """A DDP worker gets SIGTERM when its torchrun dies, even by kill -9 (Linux): no rank outlives its host's run."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        processes.die_with_parent()


if __name__ == "__main__":
    die_with_agent()
    finish(run_main("train", work, tags))
