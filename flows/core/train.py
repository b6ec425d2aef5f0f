"""The train stage's work: fine-tune a timm backbone on the decoded-once split."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from flows.core.devices import resolve_device
from flows.core.model import Preprocessing, build_model, check_model_name, preprocessing
from flows.core.params import Params, save_resolved
from flows.core.prepare import load_manifest, load_split

log = logging.getLogger("tunedeck")
EpochHook = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    best_epoch: int
    val_accuracy: float | None
    weights_from: str
    seconds: float
    model_sha256: str


class Normalizer(nn.Module):
    """uint8 NHWC batches to normalised float NCHW on the model's device."""

    def __init__(self, prep: Preprocessing, device: torch.device) -> None:
        super().__init__()
        self.mean = torch.tensor(prep.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(prep.std, device=device).view(1, 3, 1, 1) * 255

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise one batch (already on the device)."""
        return (images.permute(0, 3, 1, 2).float() - self.mean) / self.std


def batches(images: np.ndarray, labels: np.ndarray, size: int, order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) in batches, in the given order or in storage order."""
    idx = order.numpy() if order is not None else np.arange(len(labels))
    for start in range(0, len(idx), size):
        chunk = np.sort(idx[start:start + size]) if order is None else idx[start:start + size]
        yield torch.from_numpy(np.ascontiguousarray(images[chunk])), torch.from_numpy(labels[chunk])


def random_hflip(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Flip each NHWC image left-right with probability p."""
    if p <= 0:
        return x
    mask = torch.rand(len(x), generator=gen) < p
    x = x.clone()
    x[mask] = x[mask].flip(2)
    return x


@torch.no_grad()
def evaluate_split(model: nn.Module, norm: Normalizer, images: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predictions) of model on one split."""
    model.eval()
    device = norm.mean.device
    losses, preds = [], []
    for x, y in batches(images, labels, batch_size):
        logits = model(norm(x.to(device)))
        losses.append(nn.functional.cross_entropy(logits, y.to(device), reduction="sum").item())
        preds.append(logits.argmax(1).cpu().numpy())
    pred = np.concatenate(preds) if preds else np.empty(0, dtype=np.int64)
    n = max(len(labels), 1)
    return sum(losses) / n, float((pred == labels).mean()) if len(labels) else 0.0, pred


def train(params: Params, prepared: Path, out: Path, on_epoch: EpochHook | None = None) -> TrainResult:
    """Fine-tune params.model on the prepared split; write out/model.safetensors and model.json."""
    from safetensors.torch import save_file
    from timm.optim import create_optimizer_v2

    start = time.perf_counter()
    cfg = params.train
    check_model_name(params.model.name)
    manifest = load_manifest(prepared)
    classes = manifest["classes"]
    device = resolve_device(params.base.device)
    torch.manual_seed(params.base.seed)
    model, weights_from = build_model(params.model, len(classes))
    log.info("model %s on %s: %s", params.model.name, device, weights_from)
    model.to(device)
    prep = preprocessing(model)
    norm = Normalizer(prep, device)
    train_x, train_y = load_split(prepared, "train")
    val_x, val_y = load_split(prepared, "val")
    optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = _scheduler(optimizer, params)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(params.base.seed)
    best_acc, best_epoch, best_state = float("-inf"), 0, None
    steps = -(-len(train_y) // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps, desc="train", unit="step", disable=None, leave=False)
    for epoch in range(cfg.epochs):
        model.train()
        tic, seen, total = time.perf_counter(), 0, 0.0
        for x, y in batches(train_x, train_y, cfg.batch_size, torch.randperm(len(train_y), generator=gen)):
            x = random_hflip(x, cfg.hflip, gen)
            loss = loss_fn(model(norm(x.to(device, non_blocking=True))), y.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
            total += loss.item() * len(y)
            bar.update()
        metrics = {
            "train/loss": total / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "samples_per_s": seen / (time.perf_counter() - tic),
        }
        if len(val_y):
            metrics["val/loss"], metrics["val/acc"], _ = evaluate_split(model, norm, val_x, val_y, params.evaluate.batch_size)
        if scheduler is not None:
            scheduler.step(epoch + 1)
        score = metrics.get("val/acc", -metrics["train/loss"])
        if score > best_acc:
            best_acc, best_epoch = score, epoch
            best_state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
        log.info("epoch %d/%d  %s", epoch + 1, cfg.epochs, "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file(best_state, str(weights))
    sha = _sha256(weights)
    config = {
        "model_name": params.model.name,
        "classes": classes,
        "image_size": manifest["image_size"],
        "mean": prep.mean,
        "std": prep.std,
        "interpolation": prep.interpolation,
        "weights_from": weights_from,
        "data_version": manifest["data_version"],
        "best_epoch": best_epoch + 1,
        "val_accuracy": best_acc if len(val_y) else None,
        "sha256": sha,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "model.json").write_text(json.dumps(config, indent=2))
    save_resolved(params, out)
    return TrainResult(best_epoch + 1, config["val_accuracy"], weights_from, time.perf_counter() - start, sha)


def _scheduler(optimizer: torch.optim.Optimizer, params: Params):
    """timm's scheduler for train.scheduler, stepped once per epoch (None for 'none')."""
    from timm.scheduler import create_scheduler_v2

    cfg = params.train
    if cfg.scheduler == "none":
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.scheduler,
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        decay_epochs=max(1, cfg.epochs // 3),
        min_lr=cfg.lr * 0.01,
    )
    return scheduler


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
