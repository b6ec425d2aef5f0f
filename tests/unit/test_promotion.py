"""The promotion gate's decision on figures both models earned on the same test split."""

from __future__ import annotations

import numpy as np

from flows.core.promotion import Figures, decide


def figures(accuracy: float, **recall: float) -> Figures:
    return Figures(accuracy=accuracy, recall=recall, n_test=100)


def test_no_prod_promotes():
    decision = decide(figures(0.5, a=0.5), None, 0.01, 0.05)
    assert decision.promote and "no prod" in decision.summary()


def test_a_candidate_within_the_tolerance_is_promoted():
    assert decide(figures(0.895, a=0.9, b=0.89), figures(0.90, a=0.9, b=0.9), 0.01, 0.05).promote


def test_a_candidate_below_prod_beyond_the_tolerance_is_rejected_with_both_figures():
    decision = decide(figures(0.85, a=0.85, b=0.85), figures(0.90, a=0.9, b=0.9), 0.01, 0.10)
    assert not decision.promote
    assert decision.reasons == ["test accuracy 0.8500 is below prod's 0.9000 minus the tolerance 0.01 (0.8900)"]
    assert decision.to_dict()["prod"]["accuracy"] == 0.9


def test_one_class_dropping_too_far_rejects_even_when_accuracy_rises():
    decision = decide(figures(0.95, a=1.0, b=0.80), figures(0.90, a=0.9, b=0.9), 0.01, 0.05)
    assert not decision.promote and "class 'b' recall drops 0.1000" in decision.reasons[0]


def test_figures_from_predictions():
    labels, pred = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    got = Figures.of(labels, pred, ["x", "y", "z"])
    assert got.accuracy == 0.6 and got.recall == {"x": 0.5, "y": 1.0, "z": 0.0} and got.n_test == 5
