"""Scoring a model on a stored split (used by validation during training and by evaluate)."""

from __future__ import annotations

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
def score(model: nn.Module, norm: Normalizer, images: np.ndarray, labels: np.ndarray, batch_size: int, autocast=None) -> tuple[float, float, np.ndarray]:
    """(mean loss, accuracy, predictions) of model on one split."""
    import contextlib

    was_training = model.training
    model.eval()
    device = norm.mean.device
    losses, preds = [], []
    for x, y in ordered_batches(images, labels, batch_size):
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(norm(x.to(device))).float()
        losses.append(nn.functional.cross_entropy(logits, y.to(device), reduction="sum").item())
        preds.append(logits.argmax(1).cpu().numpy())
    model.train(was_training)
    pred = np.concatenate(preds) if preds else np.empty(0, dtype=np.int64)
    n = max(len(labels), 1)
    return sum(losses) / n, float((pred == labels).mean()) if len(labels) else 0.0, pred
