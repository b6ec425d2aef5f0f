"""Calibration: how far a model's confidence can be trusted, and a temperature that fixes it.

ECE with equal-width confidence bins (Guo et al. 2017, 15 bins by default), NLL, the multi-class
Brier score, the reliability diagram's bins, and temperature scaling fitted on validation logits.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _bin_of(confidence: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each confidence: (k/bins, (k+1)/bins], with 0 in the first bin."""
    return np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Each non-empty bin: its range, mean confidence, accuracy and count (the reliability diagram)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = _bin_of(confidence, bins)
    rows = []
    for k in range(bins):
        inside = which == k
        if inside.any():
            rows.append({"bin": round((k + 0.5) / bins, 4), "lower": k / bins, "upper": (k + 1) / bins,
                         "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean()),
                         "count": int(inside.sum())})
    return rows


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy − confidence| over the bins."""
    probs = np.asarray(probs)
    if not len(labels):
        return 0.0
    return ece_of(probs.max(axis=1), probs.argmax(axis=1) == np.asarray(labels), bins)


def ece_of(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE from each image's top-class probability and whether the top class was right."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if not len(confidence):
        return 0.0
    which = _bin_of(confidence, bins)
    counts = np.bincount(which, minlength=bins)
    gaps = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))  # per-bin sums' difference
    return float(gaps[counts > 0].sum() / len(confidence))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    picked = np.asarray(probs)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean()) if len(labels) else 0.0


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: the mean over images of Σ_k (p_k − 1[y = k])²."""
    probs = np.asarray(probs, dtype=np.float64)
    if not len(labels):
        return 0.0
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), np.asarray(labels)] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) (1.0 with no data).

    One parameter, so a bounded scalar search on log T is exact enough and needs no gradients.
    """
    from scipy.optimize import minimize_scalar

    if not len(labels) or np.asarray(logits).ndim != 2:
        return 1.0
    result = minimize_scalar(lambda log_t: nll(softmax(logits, float(np.exp(log_t))), labels),
                             bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return round(float(np.exp(result.x)), 4)


def calibration_metrics(logits: np.ndarray, labels: np.ndarray, temperature: float, bins: int = ECE_BINS) -> dict[str, float]:
    """ECE, NLL and Brier with the model's temperature applied, and ECE and NLL without it."""
    scaled, raw = softmax(logits, temperature), softmax(logits)
    return {"ece": ece(scaled, labels, bins), "nll": nll(scaled, labels), "brier": brier(scaled, labels),
            "ece_raw": ece(raw, labels, bins), "nll_raw": nll(raw, labels), "temperature": temperature}
