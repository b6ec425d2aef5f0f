"""A silo's local round for FedAvg through the one Trainer, and the global model's score: torch and timm only, no
Prefect.

Each round a silo starts from the global weights with a fresh optimizer (plain FedAvg) and trains
``epochs`` epochs of the federation's run on its own images, through flows.core.trainer's
Trainer.train_round: every train param means what it means in the train stage (the LR schedule
runs over the federation's whole run, rounds x local epochs; freezing, augmentation, precision and
micro-batches as there), so a federated run and a centralised run with the same total epochs see
the same schedule. A param with no meaning in a round (early stopping, EMA, a plateau schedule,
checkpoints: a silo has no validation split and keeps nothing between rounds) is refused in one
sentence.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flows.contracts import PrepareManifest
from flows.core.augment import Normalizer
from flows.core.distributed import World
from flows.core.errors import TunedeckError
from flows.core.model import preprocessing
from flows.core.params import BaseParams, DataParams, ModelParams, Params, TrainParams
from flows.core.prepare import Splits
from flows.core.scoring import score
from flows.core.trainer import Trainer

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Schedule:
    """Where a silo's local epochs sit in the federation's run: global epochs [first, first + epochs) of total; the
    silo's seed (its batches and augmentation)."""

    first: int
    epochs: int
    total: int
    seed: int


def silo_seed(seed: int, silo: str, round_: int) -> int:
    """A silo's seed in one round: its own (its batches are not another silo's) and the round's (no round repeats
    another's augmentation draws)."""
    return seed + zlib.crc32(silo.encode()) % 10_000 + 10_000 * round_


def check_round_params(cfg: TrainParams) -> None:
    """One sentence for the train params a local round cannot honour (before any round starts, and in each silo)."""
    unused = [f"train.{name}" for name, set_ in (
        ("early_stopping", cfg.early_stopping is not None), ("ema_decay", cfg.ema_decay is not None),
        ("scheduler: plateau", cfg.scheduler == "plateau"), ("checkpoint_every", cfg.checkpoint_every != 0),
        ("keep_top", cfg.keep_top != 1),
    ) if set_]
    if unused:
        raise TunedeckError(f"{', '.join(unused)} cannot work in a federated round (a silo has no validation split and "
                            "keeps no checkpoints between rounds): leave them at their defaults for a federated run.")


def round_params(cfg: TrainParams, model_name: str, image_size: int, when: Schedule) -> Params:
    """The Params a silo's Trainer runs with: the coordinator's train params over the federation's total epochs."""
    return Params(
        base=BaseParams(seed=when.seed), data=DataParams(source="silo", image_size=image_size),
        model=ModelParams(name=model_name, pretrained=False), train=cfg.model_copy(update={"epochs": when.total}),
    )


def local_round(model: nn.Module, model_name: str, x: np.ndarray, y: np.ndarray, cfg: TrainParams, when: Schedule,
                classes: list[str], device: torch.device = CPU, cpu_bf16: bool | None = None, mu: float = 0.0,
                private=None) -> float:
    """Train model in place on (x uint8 NHWC, y) for the round's epochs; the mean training loss of the last one.
    cpu_bf16: the process's setting of whether the CPU has native bf16 (None: its flags say); mu: FedProx's proximal
    weight (0: plain FedAvg); private: a flows.core.privacy.Private for DP-SGD."""
    check_round_params(cfg)
    params = round_params(cfg, model_name, x.shape[1], when)
    manifest = PrepareManifest(source="silo", data_version="", classes=classes, image_size=x.shape[1],
                               counts={"train": len(y)})
    trainer = Trainer(params, manifest, Splits.train_only(x, y), device, World(), None, model=model, cpu_bf16=cpu_bf16,
                      private=private)
    if mu > 0:
        trainer.grad_hooks.append(proximal_pull(model, mu))
    return trainer.train_round(when.first, when.epochs)


def proximal_pull(model: nn.Module, mu: float):
    """FedProx (Li et al. 2020): the gradient of (mu / 2) ||w - w_global||^2, added to every step's gradient, with the
    round's starting weights as w_global. Under DP-SGD it is added after the noise: it reads no image."""
    anchor = [p.detach().clone() for p in model.parameters()]

    def pull(module: nn.Module) -> None:
        with torch.no_grad():
            for p, a in zip(module.parameters(), anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(p - a, alpha=mu)

    return pull


def global_score(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int,
                 device: torch.device = CPU) -> tuple[float, float]:
    """(loss, accuracy) of the model on held-out images."""
    prep = preprocessing(model)
    loss, acc, _ = score(model.to(device), Normalizer(prep.mean, prep.std, device), x, y, batch_size)
    return loss, acc


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A contiguous CPU copy of the model's state dict (what safetensors stores)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
