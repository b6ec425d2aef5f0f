"""A silo's local training for FedAvg, and the global model's score: torch and timm only, no Prefect.

Each round a silo starts from the global weights with a fresh optimizer (plain FedAvg) and trains
``epochs`` epochs on its own images. The LR follows one cosine over the federation's whole run
(rounds x local epochs), and freezing follows ``train.freeze_epochs`` on the same global epoch
count, so a federated run and a centralised run with the same total epochs see the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flows.core.augment import Normalizer, crop_and_flip, epoch_order
from flows.core.model import preprocessing
from flows.core.params import TrainParams
from flows.core.scoring import score
from flows.core.transfer import Freezer, param_groups

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Schedule:
    """Where a silo's local epochs sit in the federation's run: global epochs [first, first + epochs) of total."""

    first: int
    epochs: int
    total: int
    seed: int


def lr_at(cfg: TrainParams, epoch: int, total: int) -> float:
    """The LR of one global epoch: cosine from train.lr down to 1 % of it over total epochs, or constant."""
    if cfg.scheduler == "none" or total <= 1:
        return cfg.lr
    floor = cfg.lr * 0.01
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * epoch / total))


def local_train(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainParams, when: Schedule,
                device: torch.device = CPU) -> float:
    """Train model in place on (x uint8 NHWC, y) for when.epochs epochs; the mean training loss of the last one."""
    from timm.optim import create_optimizer_v2

    prep = preprocessing(model)
    norm = Normalizer(prep.mean, prep.std, device)
    model.to(device)
    freezer = Freezer(model, cfg)
    optimizer = create_optimizer_v2(param_groups(model, cfg), opt=cfg.optimizer, lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loss_sum, seen = 0.0, 0
    for epoch in range(when.first, when.first + when.epochs):
        freezer.apply(epoch)
        model.train()
        freezer.set_bn_modes()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, epoch, when.total) * group.get("lr_scale", 1.0)
        gen = torch.Generator().manual_seed(when.seed * 100_003 + epoch)
        loss_sum, seen = 0.0, 0
        for idx in _batches(len(y), cfg.batch_size, when.seed, epoch):
            images = crop_and_flip(torch.from_numpy(np.asarray(x[idx.numpy()])), cfg, gen).to(device)
            target = torch.from_numpy(np.asarray(y[idx.numpy()], dtype=np.int64)).to(device)
            loss = loss_fn(model(norm(images)), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
    return loss_sum / max(seen, 1)


def _batches(n: int, size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The epoch's batches in a (seed, epoch) order; a short last batch is dropped unless it is the only one."""
    batches = list(epoch_order(n, seed, epoch).split(size))
    if len(batches) > 1 and len(batches[-1]) < size:  # as the Trainer: no 1-image BatchNorm batch
        batches.pop()
    return batches


def global_score(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int,
                 device: torch.device = CPU) -> tuple[float, float]:
    """(loss, accuracy) of the model on held-out images."""
    prep = preprocessing(model)
    loss, acc, _ = score(model.to(device), Normalizer(prep.mean, prep.std, device), x, y, batch_size)
    return loss, acc


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of the model's state dict (what safetensors stores)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
