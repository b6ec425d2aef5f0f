"""The promotion gate's decision on figures both models earned on the same test split."""

from __future__ import annotations

import numpy as np
import pytest

from flows.core.promotion import Figures, decide, not_compared


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


def counted(correct: int, n: int = 100) -> Figures:
    """Figures of a model that labels `correct` of n test images of one class right: accuracies as the gate
    really meets them (ratios of counts, with their float rounding), not hand-typed decimals."""
    labels = np.zeros(n, dtype=np.int64)
    pred = np.where(np.arange(n) < correct, 0, 1)
    return Figures.of(labels, pred, ["a", "b"])


@pytest.mark.parametrize(("correct", "verdict"), [
    (91, "promoted"),  # better than prod
    (90, "promoted"),  # equal
    (89, "promoted"),  # exactly prod's accuracy minus the tolerance: the floor itself passes
    (88, "rejected"),  # one test image below the floor
])
def test_the_tolerance_boundary_one_test_image_either_side(correct, verdict):
    decision = decide(counted(correct), counted(90), tolerance=0.01, max_class_drop=1.0)
    assert decision.verdict == verdict, decision.summary()
    assert decision.promote is (verdict == "promoted")


@pytest.mark.parametrize(("accuracy", "verdict"), [
    (0.8901, "promoted"),  # just inside: 1e-4 above the floor of 0.89
    (0.8899, "rejected"),  # just outside: 1e-4 below it
])
def test_the_tolerance_boundary_just_inside_and_just_outside(accuracy, verdict):
    decision = decide(figures(accuracy, a=0.9), figures(0.90, a=0.9), 0.01, 0.05)
    assert decision.verdict == verdict, decision.summary()
    if verdict == "rejected":
        assert decision.reasons == ["test accuracy 0.8899 is below prod's 0.9000 minus the tolerance 0.01 (0.8900)"]


@pytest.mark.parametrize(("recall_b", "verdict"), [
    (0.85, "promoted"),    # a drop of exactly max_class_drop passes
    (0.8499, "rejected"),  # 1e-4 more does not
])
def test_the_class_drop_boundary_just_inside_and_just_outside(recall_b, verdict):
    decision = decide(figures(0.95, a=1.0, b=recall_b), figures(0.90, a=0.9, b=0.9), 0.01, 0.05)
    assert decision.verdict == verdict, decision.summary()


def test_a_known_better_candidate_is_promoted_and_a_known_worse_one_rejected():
    prod = figures(0.80, a=0.8, b=0.8)
    better, worse = figures(0.95, a=0.95, b=0.95), figures(0.60, a=0.6, b=0.6)
    assert decide(better, prod, 0.01, 0.05).verdict == "promoted"
    rejected = decide(worse, prod, 0.01, 0.05)
    assert rejected.verdict == "rejected" and len(rejected.reasons) == 3  # accuracy, and both classes' recall


def test_a_prod_model_that_cannot_be_scored_is_could_not_compare_and_promotes_nothing():
    why = "model v0.1.0 (commit 0123456789ab, prod) is in neither this clone's DVC cache nor its DVC remote 'local' (/r)"
    decision = not_compared(figures(0.99, a=1.0), why, 0.01, 0.05)
    assert decision.verdict == "could not compare" and not decision.promote
    assert decision.summary() == f"could not compare: {why}."
    assert decision.to_dict()["verdict"] == "could not compare" and decision.to_dict()["prod"] is None


@pytest.mark.parametrize("prod", [None, figures(0.90, a=0.9, b=0.9)])
def test_the_gates_process_hands_the_flow_back_the_same_judgement_through_promotion_json(tmp_path, prod):
    """A pipeline run's gate runs as a process of its own (flows.ship.judging): what the flow reads back from
    promotion.json is the judgement it wrote, promoted or rejected, with or without a prod model."""
    from flows.ship.gate import Judgement, read_judgement, write_promotion

    decision = decide(figures(0.85, a=0.8, b=0.9), prod, 0.01, 0.05)
    judgement = Judgement(decision, None if prod else "v1.0.0", "v0.1.0" if prod else None, "ab" * 32,
                          {"who": "me", "why": "a test"})
    write_promotion(tmp_path, judgement)
    assert read_judgement(tmp_path) == judgement
