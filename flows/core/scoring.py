"""Scoring a model on a stored split (used by validation during training, by evaluate and by promote)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from flows.core.augment import Normalizer


def ordered_batches(images: np.ndarray, labels: np.ndarray, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels) in storage order, size at a time."""
    for start in range(0, len(labels), size):
        yield torch.from_numpy(np.array(images[start:start + size])), torch.from_numpy(labels[start:start + size])


@torch.no_grad()
def logits_of(model: nn.Module, norm: Normalizer, images: np.ndarray, batch_size: int, autocast=None) -> np.ndarray:
    """The model's float32 logits for every image of a split, in storage order (N × classes)."""
    was_training = model.training
    model.eval()
    device = norm.mean.device
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.array(images[start:start + batch_size]))
        with autocast() if autocast else contextlib.nullcontext():
            out.append(model(norm(x.to(device))).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.empty((0, 0), dtype=np.float32)


def score(model: nn.Module, norm: Normalizer, images: np.ndarray, labels: np.ndarray, batch_size: int, autocast=None) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predictions) of model on one split."""
    if not len(labels):
        return 0.0, 0.0, np.empty(0, dtype=np.int64)
    logits = torch.from_numpy(logits_of(model, norm, images, batch_size, autocast))
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    loss = nn.functional.cross_entropy(logits, target).item()
    pred = logits.argmax(1).numpy()
    return loss, float((pred == labels).mean()), pred
