"""A stratified train/val/test split that depends only on the labels and the seed."""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    limit_per_class: int | None = None,
) -> dict[str, np.ndarray]:
    """Indices for train, val and test, each class split in the same proportions.

    Every class keeps at least one training image; ``limit_per_class`` caps the training
    images of each class (the rest are dropped), for few-label experiments and quick subsets.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = round(len(idx) * test_fraction)
        n_val = round(len(idx) * val_fraction)
        while n_test + n_val >= len(idx) and (n_test or n_val):
            if n_val >= n_test and n_val:
                n_val -= 1
            else:
                n_test -= 1
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:][:limit_per_class])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
