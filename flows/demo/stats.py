"""The demo's statistics: mean ± std per arm and a paired t interval for the difference.

A claim about accuracy is measured over seeds (each seed another draw of labelled images and
another initialisation), never one run: on a few labels one seed's margin moves by 15 points
from one CPU to another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of one arm's accuracies."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Difference:
    """A paired difference (a - b, seed by seed): its mean, std and two-sided confidence interval."""

    mean: float
    std: float
    low: float
    high: float
    level: float
    n: int


def summarise(values: list[float]) -> Summary:
    """Mean and sample standard deviation (n - 1); a single value has std 0."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, std, n)


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> Difference:
    """Student's t interval of the mean of a[i] - b[i] (the seeds pair the two arms)."""
    from scipy.stats import t

    if len(a) != len(b) or len(a) < 2:
        raise ValueError("a paired difference needs two lists of equal length, at least 2 each")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    s = summarise(diffs)
    half = t.ppf(0.5 + level / 2, s.n - 1) * s.std / math.sqrt(s.n)
    return Difference(s.mean, s.std, s.mean - half, s.mean + half, level, s.n)
