"""Differential privacy in a silo's local training: DP-SGD through Opacus, and the accountant of what it spent.

DP-SGD (Abadi et al. 2016) bounds what one image can change: every image's gradient is clipped to
``clip_norm``, the clipped gradients are summed, Gaussian noise of standard deviation
``noise_multiplier x clip_norm`` is added, and the sum is divided by the expected batch size.
Batches are Poisson samples (each image in with probability q = batch / images, independently
per step), the sampling the accountant's bound assumes. Opacus computes the per-image gradients
(GradSampleModule) and clips and noises them (DPOptimizer); its accountant (RDP or PRV) turns
the steps taken, q and the noise into (epsilon, delta).

A silo keeps its own ``Ledger``: every (noise, q, steps) it took, over every round, so the epsilon
it reports composes all of them. BatchNorm mixes the images of a batch (one image changes the
others' outputs), which per-image clipping cannot bound: a model with BatchNorm is refused in one
sentence, naming backbones without it.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from flows.contracts.federated import PrivacyParams
from flows.core.atomic import replace_atomically
from flows.core.errors import TunedeckError

MAX_NOISE = 20.0  # above this, DP-SGD's noise drowns any signal a silo's gradients carry
NO_BATCHNORM = "resnet50_gn, convnext_*, vit_*, efficientnet_*_gn"


@dataclass
class Ledger:
    """Every (noise_multiplier, sample_rate, steps) a silo took, and the epsilon they add up to."""

    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def epsilon(self, delta: float, extra: tuple[float, float, int] | None = None) -> float:
        """(epsilon at delta) of the history, plus ``extra`` steps if given; 0 with no steps."""
        entries = self.history + ([extra] if extra else [])
        if not entries:
            return 0.0
        from opacus.accountants import create_accountant

        accountant = create_accountant(mechanism=self.accountant)
        accountant.history = [(float(s), float(q), int(n)) for s, q, n in entries]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha" note
            return float(accountant.get_epsilon(delta=delta))

    def save(self, path: Path) -> None:
        data = json.dumps({"accountant": self.accountant, "history": self.history})
        replace_atomically(path, lambda tmp: tmp.write_text(data))

    @classmethod
    def load(cls, path: Path, accountant: str) -> Ledger:
        if not path.is_file():
            return cls(accountant)
        data = json.loads(path.read_text())
        return cls(data["accountant"], [tuple(h) for h in data["history"]])


@dataclass(frozen=True)
class Plan:
    """How a silo trains privately: its noise, sampling rate, steps per round, delta, and what the run would spend."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    delta: float
    planned_epsilon: float  # after every round of the run

    def entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Poisson batches an epoch draws: as many as plain batches of batch_size would cover the images."""
    return max(1, round(images / batch_size))


def plan(cfg: PrivacyParams, images: int, batch_size: int, epochs_per_round: int, rounds: int) -> Plan:
    """The silo's plan for the run; one sentence when it cannot keep the promise (too few images, an unreachable ε)."""
    if images < batch_size:
        raise TunedeckError(f"this silo has {images} images, fewer than one batch ({batch_size}): DP-SGD samples batches "
                            "of that expected size, so lower train.batch_size or leave this silo out.")
    q = batch_size / images
    steps = epochs_per_round * steps_per_epoch(images, batch_size)
    delta = cfg.delta if cfg.delta is not None else 1.0 / images
    sigma = cfg.noise_multiplier
    if sigma is None:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            sigma = get_noise_multiplier(target_epsilon=cfg.target_epsilon, target_delta=delta, sample_rate=q,
                                         steps=steps * rounds, accountant=cfg.accountant)
        except ValueError:
            sigma = math.inf
        if sigma > MAX_NOISE:
            raise TunedeckError(
                f"privacy.target_epsilon {cfg.target_epsilon:g} over {rounds} rounds of {steps} steps on {images} images "
                f"needs a noise multiplier above {MAX_NOISE:g}, at which nothing is learnt: raise the target, take fewer "
                "rounds or local epochs, or give this silo more images.")
    ledger = Ledger(cfg.accountant)
    spent = ledger.epsilon(delta, (sigma, q, steps * rounds))
    if cfg.target_epsilon is not None and ledger.epsilon(delta, (sigma, q, steps)) > cfg.target_epsilon * 1.001:
        raise TunedeckError(
            f"one round of {steps} steps at noise {sigma:g} already spends more than privacy.target_epsilon "
            f"{cfg.target_epsilon:g} on {images} images: raise the noise or the target, or lower the local epochs.")
    return Plan(float(sigma), q, steps, delta, spent)


def refuse_batchnorm(model: nn.Module, name: str) -> None:
    """One sentence when the model has BatchNorm (which DP-SGD's per-image bound cannot hold)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if layers:
        raise TunedeckError(
            f"{name} has {len(layers)} BatchNorm layers (e.g. {layers[0]}), which mix the images of a batch, so "
            f"DP-SGD's per-image bound does not hold: choose a backbone without BatchNorm ({NO_BATCHNORM}).")


def check_train_params(cfg) -> None:
    """One sentence for train params DP-SGD cannot honour (they mix images, or clip otherwise)."""
    odd = [f"train.{n}" for n, bad in (("mixup", cfg.mixup > 0), ("cutmix", cfg.cutmix > 0),
                                        ("clip_grad", cfg.clip_grad is not None), ("accum_steps", cfg.accum_steps != 1),
                                        ("compile", cfg.compile)) if bad]
    if odd:
        raise TunedeckError(f"{', '.join(odd)} cannot work with DP-SGD (mixing images breaks the per-image bound; "
                            "privacy.clip_norm does the clipping; one Poisson batch per step): leave them at their defaults.")


class Private:
    """DP-SGD for one Trainer: the per-image gradient module, the noising optimizer, Poisson batches."""

    def __init__(self, cfg: PrivacyParams, plan_: Plan, batch_size: int, seed: int) -> None:
        self.cfg, self.plan, self.batch_size = cfg, plan_, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.module = None

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(the forward module, the optimizer) DP-SGD trains through: per-image gradients in, clipped and noised out."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        for m in model.modules():  # an in-place activation overwrites what the per-image hooks read
            if hasattr(m, "inplace") and isinstance(m.inplace, bool):
                m.inplace = False
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # the input needs no gradient: fine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.module = GradSampleModule(model, loss_reduction="sum")
        noisy = DPOptimizer(optimizer, noise_multiplier=self.plan.noise_multiplier, max_grad_norm=self.cfg.clip_norm,
                            expected_batch_size=self.batch_size, loss_reduction="mean", generator=self.gen)
        return self.module, noisy

    def batches(self, images: int, epoch: int, seed: int) -> list[torch.Tensor]:
        """The epoch's Poisson batches: steps_per_epoch draws, each image in each with probability q."""
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        steps = steps_per_epoch(images, self.batch_size)
        return [torch.nonzero(torch.rand(images, generator=gen) < self.plan.sample_rate).flatten() for _ in range(steps)]

    def close(self) -> None:
        """Take the per-image hooks off the model (a later round wraps it afresh)."""
        if self.module is not None:
            self.module._close()
            self.module = None

    def empty_step(self, model: nn.Module, optimizer) -> None:
        """A step whose Poisson batch came out empty: noise only (skipping it would tell the batch was empty)."""
        for p in model.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
