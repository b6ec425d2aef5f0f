"""Checkpoint files: last/previous rotation and the top-N kept as they were when they were best."""

from __future__ import annotations

import torch

from flows.core import checkpoint as ckpt


def test_top_keeps_each_epochs_own_contents_after_last_moves_on(tmp_path):
    scores = [0.5, 0.9, 0.7, 0.8]
    for epoch, score in enumerate(scores):
        last = ckpt.save(tmp_path, {"epoch": epoch, "weights": torch.full((3,), float(epoch))})
        ckpt.keep_top(tmp_path, last, epoch, score, n=2)
    kept = sorted(p.name for p in (tmp_path / "top").iterdir())
    assert kept == ["epoch0002_score0.900000.pt", "epoch0004_score0.800000.pt"]
    best = torch.load(tmp_path / "top" / kept[0], weights_only=False)
    assert best["epoch"] == 1 and torch.equal(best["weights"], torch.full((3,), 1.0))
    assert torch.load(tmp_path / ckpt.LAST, weights_only=False)["epoch"] == 3
    assert torch.load(tmp_path / ckpt.PREVIOUS, weights_only=False)["epoch"] == 2
