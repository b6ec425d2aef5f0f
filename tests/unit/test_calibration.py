"""Calibration metrics against a reference computed by hand, and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

from flows.core.calibration import brier, calibration_metrics, ece, fit_temperature, nll, reliability, softmax

K = 10


def calibrated_scores(n: int, seed: int, overconfident: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose top confidence p is right with probability p (or much less, when overconfident)."""
    rng = np.random.default_rng(seed)
    top = rng.integers(0, K, n)
    p = rng.uniform(0.95, 1.0, n) if overconfident else rng.uniform(1.0 / K + 0.01, 1.0, n)
    probs = np.repeat(((1 - p) / (K - 1))[:, None], K, axis=1)
    probs[np.arange(n), top] = p
    right = rng.uniform(size=n) < (0.6 if overconfident else p)
    other = (top + rng.integers(1, K, n)) % K
    return probs, np.where(right, top, other)


def ece_by_hand(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """The textbook definition, one bin at a time: sum over bins of |B|/n * |acc(B) - conf(B)|, bins (k/M, (k+1)/M]."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        inside = (conf > lo) & (conf <= hi) if k else (conf >= lo) & (conf <= hi)
        if inside.sum():
            total += inside.sum() / len(labels) * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return float(total)


def test_ece_is_small_for_calibrated_scores_and_large_for_overconfident_ones():
    probs, labels = calibrated_scores(20_000, seed=0)
    assert ece(probs, labels) < 0.02
    probs, labels = calibrated_scores(20_000, seed=1, overconfident=True)
    assert ece(probs, labels) > 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_the_textbook_computation(seed):
    probs, labels = calibrated_scores(5_000, seed=seed, overconfident=bool(seed % 2))
    assert abs(ece(probs, labels) - ece_by_hand(probs, labels)) < 1e-6


def test_reliability_bins_count_every_image_once():
    probs, labels = calibrated_scores(1_000, seed=3)
    rows = reliability(probs, labels)
    assert sum(r["count"] for r in rows) == 1_000
    assert all(r["lower"] < r["confidence"] <= r["upper"] for r in rows)


def test_nll_and_brier_of_perfect_and_uniform_predictions():
    labels = np.array([0, 1, 2])
    perfect = np.eye(3)
    assert nll(perfect, labels) == pytest.approx(0.0, abs=1e-9) and brier(perfect, labels) == 0.0
    uniform = np.full((3, 3), 1 / 3)
    assert nll(uniform, labels) == pytest.approx(np.log(3)) and brier(uniform, labels) == pytest.approx(2 / 3)


def test_temperature_scaling_lowers_the_nll_of_overconfident_logits():
    rng = np.random.default_rng(4)
    probs, labels = calibrated_scores(4_000, seed=4)
    logits = np.log(probs) * 4.0 + rng.normal(0, 0.01, probs.shape)  # the same ranking, four times too sharp
    t = fit_temperature(logits, labels)
    assert 3.0 < t < 5.0
    assert nll(softmax(logits, t), labels) < nll(softmax(logits), labels)
    metrics = calibration_metrics(logits, labels, t)
    assert metrics["ece"] < metrics["ece_raw"] and metrics["nll"] < metrics["nll_raw"]


def test_temperature_without_validation_images_is_one():
    assert fit_temperature(np.empty((0, 3)), np.empty(0, dtype=int)) == 1.0
