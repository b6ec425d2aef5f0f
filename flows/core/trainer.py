"""The Trainer: one fine-tuning run, epoch by epoch, resumable at any checkpoint."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from timm.scheduler import create_scheduler_v2
from torch import nn
from tqdm import tqdm

from flows.contracts import PrepareManifest
from flows.core import checkpoint as ckpt
from flows.core.augment import BatchAugment, Normalizer, PolicyImages, crop_and_flip, epoch_order, policy_batches
from flows.core.distributed import World, all_reduce_sum, broadcast_flag, broadcast_value
from flows.core.errors import TunedeckError
from flows.core.model import build_model, preprocessing
from flows.core.params import Params
from flows.core.prepare import Splits
from flows.core.scoring import score
from flows.core.speed import (
    Precision,
    autocast,
    fused_option,
    grad_scaler,
    maybe_compile,
    nchw_for_small_maps,
    peak_memory_mb,
    resolve_precision,
    retain_freed_memory,
    uses_convolutions,
)
from flows.core.train_state import TrainState
from flows.core.trainer_files import TrainerFiles
from flows.core.transfer import Freezer, param_groups

log = logging.getLogger("tunedeck")


class Tracker(Protocol):
    """Where per-epoch metrics go (dvclive in the stage; nothing in tests)."""

    def start(self, resumed: bool, first_epoch: int = 0) -> None:
        """Called once, before the first epoch logged; epochs before first_epoch are replayed from a checkpoint."""

    def log(self, epoch: int, metrics: dict[str, float]) -> None:
        """Metrics of one finished epoch (0-based)."""


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    best_epoch: int
    val_accuracy: float | None
    weights_from: str
    seconds: float
    model_sha256: str
    epochs_run: int
    resumed_at: str | None
    oom_events: int
    precision: str = "fp32"  # bf16, fp16 or fp32: what autocast ran in
    precision_reason: str = ""  # why (train.precision, or what auto found on the device)
    device: str = "cpu"  # where it trained (torch's name: cuda:1, mps, cpu)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg):
    """timm's schedule named by train.scheduler (None for `none`), stepped once per epoch."""
    if cfg.scheduler == "none":
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.scheduler, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        decay_epochs=max(1, cfg.epochs // 3), decay_milestones=[max(1, cfg.epochs * 2 // 3)],
        min_lr=cfg.lr * 0.01, warmup_lr=cfg.lr * 0.01,
    )
    return scheduler


def step_scheduler(scheduler, epoch: int, val_acc: float | None, world: World, device: torch.device) -> None:
    """Step the schedule at the end of an epoch on rank 0's validation accuracy, on every rank alike."""
    if scheduler is not None:
        scheduler.step(epoch + 1, broadcast_value(val_acc, world, device))


class Trainer(TrainerFiles):
    """Holds the model, optimizer, schedule, EMA and data of one run."""

    def __init__(self, params: Params, manifest: PrepareManifest, data: Path | Splits, device: torch.device, world: World,
                 tracker, model: nn.Module | None = None, cpu_bf16: bool | None = None, private=None) -> None:
        """data: the prepare stage's folder, or the splits themselves; model: weights to start from (a FedAvg round's
        global model) instead of params.model's; cpu_bf16: whether the CPU has native bf16 (None: its flags say);
        private: a flows.core.privacy.Private to train with DP-SGD (a silo's round)."""
        from timm.loss import SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2

        self.params, self.cfg, self.device, self.world, self.tracker = params, params.train, device, world, tracker
        self.classes = manifest.classes
        self.image_size = manifest.image_size
        self.data_version = manifest.data_version
        self.precision = resolve_precision(self.cfg.precision, device, cpu_bf16)
        self.private = private
        if private is not None and self.precision.dtype is not None:
            self.precision = Precision(None, "DP-SGD computes per-image gradients in fp32")
        self.dtype = self.precision.dtype
        torch.manual_seed(params.base.seed)
        if model is None:
            self.model, self.weights_from = build_model(params.model, len(self.classes))
        else:
            self.model, self.weights_from = model, "the weights it was given"
        if world.main:
            log.info("model %s on %s: %s", params.model.name, device, self.weights_from)
            log.info("precision %s (%s)", self.precision.name, self.precision.reason)
        self.channels_last = self.cfg.channels_last and uses_convolutions(self.model)
        self.model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if self.channels_last and device.type == "cpu":
            nchw_for_small_maps(self.model, self.image_size)
        prep = preprocessing(self.model)
        self.prep = prep
        self.norm = Normalizer(prep.mean, prep.std, device, self.channels_last)
        splits = data if isinstance(data, Splits) else Splits.load(data)
        self.train_x, self.train_y, self.val_x, self.val_y = splits.train_x, splits.train_y, splits.val_x, splits.val_y
        self.freezer = Freezer(self.model, self.cfg)
        self.optimizer = create_optimizer_v2(
            param_groups(self.model, self.cfg), opt=self.cfg.optimizer, lr=self.cfg.lr, **fused_option(self.cfg.optimizer, device)
        )
        self.grad_hooks: list = []  # each called with the model on a step's final gradients (FedProx's pull)
        if private is not None:
            self.private_forward, self.optimizer = private.wrap(self.model, self.optimizer)
            self.optimizer.attach_step_hook(lambda _: self._run_grad_hooks())  # after the noise, before the update
        if device.type == "cpu":
            retain_freed_memory()  # no page faults per step
        self.scheduler = self._scheduler()
        self.scaler = grad_scaler(device, self.dtype)
        self.ema = None
        if self.cfg.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=self.cfg.ema_decay)
        self.augment = BatchAugment(self.cfg, len(self.classes), device)
        reduction = "sum" if private is not None else "mean"  # DP-SGD: each image's own gradient, whole
        self.loss_fn = SoftTargetCrossEntropy() if self.augment.soft_targets else nn.CrossEntropyLoss(
            label_smoothing=self.cfg.label_smoothing, reduction=reduction)
        self.gen = torch.Generator().manual_seed(params.base.seed)
        self.policy = PolicyImages(self.train_x, self.cfg.auto_augment, params.base.seed) if self.cfg.auto_augment else None
        self.state = TrainState(micro=self.cfg.batch_size, accum=self.cfg.accum_steps)
        self.forward = self._wrap()

    # ---- set-up helpers -------------------------------------------------------------------
    def _scheduler(self):
        return make_scheduler(self.optimizer, self.cfg)

    def _wrap(self) -> nn.Module:
        """The module the forward pass runs through: DDP and torch.compile around the model."""
        module: nn.Module = self.model
        if self.private is not None:
            return self.private_forward
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DistributedDataParallel(self.model, device_ids=ids)
        wrapped = maybe_compile(module, self.cfg.compile)
        self.compiled = wrapped is not module
        return wrapped

    # ---- the run --------------------------------------------------------------------------
    def run(self, out: Path, checkpoints: Path | None, key: str) -> TrainResult:
        start = time.perf_counter()
        first_epoch, first_batch, partial = 0, 0, None
        resumed_at = None
        if checkpoints is not None:
            if hasattr(self.tracker, "before_resume"):  # the stage may be fetching this run's checkpoint from elsewhere
                self.tracker.before_resume()
            state = ckpt.load_resumable(checkpoints, key)
            if state is None and self.world.main:
                ckpt.clear(checkpoints)
            elif state is not None:
                first_epoch, first_batch, partial = self._restore(state)
                resumed_at = f"epoch {first_epoch + 1}, batch {first_batch}"
                if self.world.main:
                    log.info("resuming from %s (%s)", state["path"], resumed_at)
        if self.tracker is not None and self.world.main:
            self.tracker.start(resumed_at is not None, first_epoch)
            if hasattr(self.tracker, "describe"):  # how the run trains, beside its metrics
                self.tracker.describe({"precision": self.precision.name, "precision_reason": self.precision.reason,
                                       "compile": self.compiled})
            for logged_epoch, logged in self.state.history:  # DVC removed the metric files: write them again
                self.tracker.log(logged_epoch, logged)
        epoch = first_epoch
        for epoch in range(first_epoch, self.cfg.epochs):
            metrics = self._epoch(epoch, first_batch if epoch == first_epoch else 0, partial if epoch == first_epoch else None, checkpoints, key)
            stop = self._end_epoch(epoch, metrics, checkpoints, key)
            if broadcast_flag(stop, self.world, self.device):
                log.info("early stopping: no better val accuracy for %d epochs", self.cfg.early_stopping)
                break
        result = self._export(out, time.perf_counter() - start) if self.world.main else {}
        return TrainResult(
            best_epoch=self.state.best.epoch + 1, val_accuracy=self.state.best.val_acc, weights_from=self.weights_from,
            seconds=time.perf_counter() - start, model_sha256=result.get("sha256", ""), epochs_run=epoch + 1,
            resumed_at=resumed_at, oom_events=self.state.oom_events, precision=self.precision.name,
            precision_reason=self.precision.reason, device=str(self.device),
        )

    def train_round(self, first: int, epochs: int) -> float:
        """Epochs [first, first + epochs) of a run of train.epochs, from the model as given, with this Trainer's fresh
        optimizer: a FedAvg silo's local round. The same epochs as run() (schedule, freezing, augmentation,
        precision), without validation, checkpoints or export; the last epoch's mean training loss."""
        if self.scheduler is not None and first > 0:
            self.scheduler.step(first)  # where run() has it at this epoch's start: stepped at each epoch's end
        loss = float("nan")
        for epoch in range(first, first + epochs):
            loss = self._epoch(epoch, 0, None, None, "")["train/loss"]
            step_scheduler(self.scheduler, epoch, None, self.world, self.device)
        if self.private is not None:
            self.private.close()
        return loss

    def _epoch(self, epoch: int, first_batch: int, partial: dict | None, checkpoints: Path | None, key: str) -> dict:
        """Train one epoch from first_batch; return its metrics."""
        if self.freezer.apply(epoch):
            if epoch > 0 and self.world.main:
                log.info("epoch %d: %d parameter tensors frozen", epoch + 1, len(self.freezer.frozen))
            if self.world.size > 1:  # DDP registers the parameters that need a gradient when it wraps: again, once
                self.forward = self._wrap()
        if self.policy is not None:
            self.policy.epoch = epoch
        self.model.train()
        self.freezer.set_bn_modes()
        batches = self._batches(epoch)
        acc = partial or {"seen": 0, "loss": 0.0, "step_time": 0.0, "steps": 0}
        tic = time.perf_counter()
        bar = tqdm(total=len(batches), initial=first_batch, desc=f"epoch {epoch + 1}", unit="step", disable=None if self.world.main else True, leave=False)
        for index, x in enumerate(self._images(batches, first_batch), start=first_batch):
            y = torch.from_numpy(self.train_y[batches[index].numpy()])
            t0 = time.perf_counter()
            loss = self._optimizer_step(x, y)
            acc["step_time"] += time.perf_counter() - t0
            acc["steps"] += 1
            acc["seen"] += len(y)
            acc["loss"] += loss * len(y)
            bar.update()
            every = self.cfg.checkpoint_every
            if checkpoints is not None and every and self.state.step % every == 0 and index + 1 < len(batches):
                self._checkpoint(checkpoints, key, epoch, index + 1, acc)
        bar.close()
        seen = all_reduce_sum(acc["seen"], self.world, self.device)
        return {
            "train/loss": all_reduce_sum(acc["loss"], self.world, self.device) / max(seen, 1),
            "samples_per_s": seen / max(time.perf_counter() - tic, 1e-9),
            "step_ms": 1000 * acc["step_time"] / max(acc["steps"], 1),
            "peak_mem_mb": peak_memory_mb(self.device),
            "micro_batch": self.state.micro,
            "accum_steps": self.state.accum,
            **{f"lr/group{i}": g["lr"] for i, g in enumerate(self.optimizer.param_groups)},
        }

    def _batches(self, epoch: int) -> list[torch.Tensor]:
        """This process's effective batches of the epoch (a shard of them under DDP)."""
        if self.private is not None:
            return self.private.batches(len(self.train_y), epoch, self.params.base.seed)
        order = epoch_order(len(self.train_y), self.params.base.seed, epoch)
        order = order[: len(order) - len(order) % self.world.size][self.world.rank::self.world.size]
        size = self.cfg.batch_size * self.cfg.accum_steps
        batches = list(order.split(size))
        if len(batches) > 1 and len(batches[-1]) < size:  # drop_last, as timm does: no 1-image BatchNorm
            batches.pop()
        return batches

    def _images(self, batches: list[torch.Tensor], first: int):
        """uint8 NHWC batches on the device, from the stored split or through the policy loader."""
        pin = self.device.type == "cuda"
        if self.policy is not None:
            yield from (b.to(self.device, non_blocking=pin) for b in policy_batches(self.policy, batches[first:], self.cfg.workers, pin))
            return
        for idx in batches[first:]:
            x = torch.from_numpy(self.train_x[idx.numpy()])
            yield (x.pin_memory() if pin else x).to(self.device, non_blocking=pin)

    def _optimizer_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Augment one effective batch, accumulate its micro-batches, step; halve them on OOM."""
        if self.private is not None:
            return self._private_step(x, y)
        x = self.norm(crop_and_flip(x, self.cfg, self.gen, self.image_size))
        x, target = self.augment(x, y.to(self.device))
        while True:
            try:
                loss = self._accumulate(x, target)
                if not math.isfinite(loss):
                    raise TunedeckError(
                        f"the training loss became {loss} at step {self.state.step} in {self.precision.name} "
                        f"({self.precision.reason}): set train.precision: fp32, or lower train.lr."
                    )
                return loss
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type in ("cuda", "xpu"):
                    getattr(torch, self.device.type).empty_cache()
                st = self.state
                if st.micro == 1:
                    raise TunedeckError(
                        "out of device memory even with micro-batches of 1 image: use a smaller model or image size."
                    ) from None
                st.micro, st.accum, st.oom_events = (st.micro + 1) // 2, st.accum * 2, st.oom_events + 1
                log.warning("out of memory: micro-batch halved to %d, accumulation doubled to %d (same effective batch)", st.micro, st.accum)

    def _accumulate(self, x: torch.Tensor, target: torch.Tensor) -> float:
        chunks = list(zip(x.split(self.state.micro), target.split(self.state.micro), strict=True))
        total = 0.0
        for i, (cx, cy) in enumerate(chunks):
            sync = i == len(chunks) - 1 or self.world.size == 1
            context = self.forward.no_sync() if not sync and hasattr(self.forward, "no_sync") else contextlib.nullcontext()
            with context, autocast(self.device, self.dtype):
                loss = self.loss_fn(self.forward(cx), cy) * (len(cx) / len(x))
            self.scaler.scale(loss).backward()
            total += loss.item()
        if self.cfg.clip_grad is not None or self.grad_hooks:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad is not None:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], self.cfg.clip_grad)
        self._run_grad_hooks()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.step)
        return total

    def _private_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One DP-SGD step on a Poisson batch (no micro-batches: its per-image gradients are clipped together)."""
        if not len(y):
            self.private.empty_step(self.model, self.optimizer)
            self.state.step += 1
            return 0.0
        x = self.norm(crop_and_flip(x, self.cfg, self.gen, self.image_size))
        x, target = self.augment(x, y.to(self.device))
        try:
            loss = self.loss_fn(self.forward(x), target)
            loss.backward()
        except torch.OutOfMemoryError:
            raise TunedeckError(f"out of device memory with DP-SGD's per-image gradients of {len(y)} images: lower "
                                "train.batch_size or use a smaller model.") from None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return loss.item() / len(y)

    def _run_grad_hooks(self) -> None:
        for hook in self.grad_hooks:
            hook(self.model)

    def _end_epoch(self, epoch: int, metrics: dict, checkpoints: Path | None, key: str) -> bool:
        """Validate, keep the best, log, step the schedule, checkpoint; True to stop early."""
        if self.world.main:
            self._validate(epoch, metrics)
        step_scheduler(self.scheduler, epoch, metrics.get("val/acc"), self.world, self.device)
        stop = bool(self.cfg.early_stopping and self.state.since_best >= self.cfg.early_stopping)
        if self.world.main:
            log.info("epoch %d/%d  %s", epoch + 1, self.cfg.epochs, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if not k.startswith("lr/")))
            self.state.history.append((epoch, dict(metrics)))
            if self.tracker is not None:
                self.tracker.log(epoch, metrics)
            if checkpoints is not None:
                last = self._checkpoint(checkpoints, key, epoch + 1, 0, None)
                ckpt.keep_top(checkpoints, last, epoch, metrics.get("val/acc", -metrics["train/loss"]), self.cfg.keep_top)
                if hasattr(self.tracker, "checkpointed"):  # the stage copies it to the DVC remote
                    self.tracker.checkpointed(last, epoch + 1)
        return stop

    def _validate(self, epoch: int, metrics: dict) -> None:
        ctx = (lambda: autocast(self.device, self.dtype)) if self.dtype else None
        candidates = {"raw": self.model}
        if self.ema is not None:
            candidates["ema"] = self.ema.module
        improved = False
        for name, module in candidates.items():
            suffix = "" if name == "raw" else "_ema"
            if len(self.val_y):
                metrics[f"val/loss{suffix}"], metrics[f"val/acc{suffix}"], _ = score(module, self.norm, self.val_x, self.val_y, self.params.evaluate.batch_size, ctx)
            value = metrics.get(f"val/acc{suffix}", -metrics["train/loss"])
            improved = self.state.improve(value, epoch, name, module, metrics.get(f"val/acc{suffix}")) or improved
        self.state.since_best = 0 if improved else self.state.since_best + 1
