"""Label-free estimates (flows.core.estimate) on a synthetic classifier whose truth is known: ATC and the calibrated
confidence land near the true accuracy of a batch from the reference's distribution, their intervals hold it, and
BBSE recovers a shifted class mix. Seeded: the same numbers on any machine."""

from __future__ import annotations

import numpy as np

from flows.core.estimate import atc, atc_threshold, average_confidence, bbse


def classifier(labels: np.ndarray, rng: np.random.Generator, margin: float = 1.6, classes: int = 4) -> np.ndarray:
    """Probabilities of a calibrated classifier: softmax of its true class's margin plus unit Gaussian noise (the
    Bayes posterior of that very model, so its confidence is its accuracy)."""
    logits = rng.normal(size=(len(labels), classes)) + margin * np.eye(classes)[labels]
    return np.exp(margin * logits) / np.exp(margin * logits).sum(axis=1, keepdims=True)


def test_both_estimates_land_near_the_true_accuracy_in_distribution_and_their_intervals_hold_it():
    rng = np.random.default_rng(0)
    ref_labels = rng.integers(0, 4, 4000)
    ref_probs = classifier(ref_labels, rng)
    threshold = atc_threshold(ref_probs, ref_labels)
    errors, held = [], 0
    for _ in range(20):
        labels = rng.integers(0, 4, 500)
        probs = classifier(labels, rng)
        truth = float((probs.argmax(axis=1) == labels).mean())
        for estimate in (atc(probs, threshold), average_confidence(probs)):
            errors.append(abs(estimate.value - truth))
            held += estimate.low <= truth <= estimate.high
    assert np.mean(errors) <= 0.03, np.mean(errors)
    assert held >= 0.85 * len(errors), f"a 95 % interval held the truth {held} times of {len(errors)}"


def test_a_harder_batch_is_estimated_lower_by_both():
    rng = np.random.default_rng(1)
    ref_labels = rng.integers(0, 4, 4000)
    ref_probs = classifier(ref_labels, rng)
    threshold = atc_threshold(ref_probs, ref_labels)
    labels = rng.integers(0, 4, 500)
    easy, hard = classifier(labels, rng), classifier(labels, rng, margin=0.8)
    assert atc(hard, threshold).high < atc(easy, threshold).low
    assert average_confidence(hard).high < average_confidence(easy).low


def test_bbse_recovers_a_70_10_10_10_mix_within_5_points_per_class():
    """On batches of 500 from a 91 % accurate classifier (at 74 % its worst class misses by up to 11 points: BBSE's
    error grows as the confusion matrix blurs)."""
    rng = np.random.default_rng(2)
    ref_labels = rng.integers(0, 4, 4000)
    ref_probs = classifier(ref_labels, rng, margin=2.5)
    mix = np.array([0.7, 0.1, 0.1, 0.1])
    for _ in range(20):
        labels = rng.choice(4, size=500, p=mix)
        priors = bbse(ref_probs, ref_labels, classifier(labels, rng, margin=2.5))
        truth = np.bincount(labels, minlength=4) / len(labels)
        assert np.abs(np.array([p.value for p in priors]) - truth).max() <= 0.05
        assert all(p.low <= p.value <= p.high for p in priors)
    naive = np.bincount(classifier(labels, rng, margin=1.0).argmax(axis=1), minlength=4) / len(labels)
    priors = bbse(classifier(ref_labels, np.random.default_rng(3), margin=1.0), ref_labels,
                  classifier(labels, rng, margin=1.0))
    assert np.abs(naive - truth).max() > np.abs(np.array([p.value for p in priors]) - truth).max(), \
        "the predicted-class histogram alone is as good: the test does not separate BBSE from counting"


def test_a_reference_the_model_got_all_right_still_leaves_atc_able_to_see_a_worse_batch():
    rng = np.random.default_rng(4)
    ref_labels = rng.integers(0, 4, 400)
    ref_probs = classifier(ref_labels, rng, margin=6.0)  # every held-out image right
    assert (ref_probs.argmax(axis=1) == ref_labels).all()
    threshold = atc_threshold(ref_probs, ref_labels)
    labels = rng.integers(0, 4, 300)
    worse = classifier(labels, rng, margin=1.0)
    truth = float((worse.argmax(axis=1) == labels).mean())
    assert atc(worse, threshold).value < 0.9 > truth, "ATC called a batch near chance perfect"


def test_em_recovers_a_new_class_mix_and_its_corrected_predictions_are_more_often_right():
    """Posteriors exact for uniform training priors (three 1-D Gaussians); a batch drawn 70/20/10: EM's priors
    come within 3 points of the mix, and re-weighting the posteriors for them gets more images right (Bayes)."""
    from flows.core.estimate import em_priors

    rng = np.random.default_rng(3)
    means = np.array([-1.0, 0.0, 1.0])
    truth = rng.choice(3, 5000, p=[0.7, 0.2, 0.1])
    x = rng.normal(means[truth], 1.0)
    likelihood = np.exp(-0.5 * (x[:, None] - means[None, :]) ** 2)
    posteriors = likelihood / likelihood.sum(axis=1, keepdims=True)
    source = np.full(3, 1 / 3)
    priors, corrected = em_priors(posteriors, source)
    assert np.abs(priors - [0.7, 0.2, 0.1]).max() < 0.03, priors
    assert (corrected.argmax(1) == truth).mean() > (posteriors.argmax(1) == truth).mean()
    np.testing.assert_allclose(corrected.sum(axis=1), 1.0)
    same, unchanged = em_priors(posteriors[truth == truth[0]][:0], source)  # no images: the source mix, nothing to fix
    assert np.array_equal(same, source) and unchanged.shape == (0, 3)
