"""Drift statistics (flows.core.drift): each against a textbook or hand-computed case, then the verdict
of the default thresholds on a tiny timm model trained on synthetic images: quiet on batches of the
training distribution, raised by a blurred, a colour-inverted and a one-class-short batch.

The calibration behind the defaults (MonitorParams), measured outside the suite on this set-up with 5
training seeds, batches of 100 images against a 250-image reference:
- false alarms: 8 of 500 in-distribution batches (1.6 %; mmd_p 3, chi2_p 3, accuracy_drop 4, psi 1,
  some batches flag two), 4 of 500 (0.8 %) without labels; 2 of 250 batches of 30, 1 of 150 of 300;
- blurred (Gaussian, sigma 1 px) and colour-inverted: 50 of 50 batches each, every time by all four of
  mmd_p, domain_auc, psi and chi2_p, by wide margins (confidence_drop once in 8 models, on inversion);
- one class missing: 45 of 50 when the class is drawn at random (psi 39, chi2_p 40, mmd_p 38, never
  domain_auc: every image still looks like some reference image). A class the model confuses
  with others leaves the predicted mix nearly unchanged; the vertical stripes, removed here,
  were caught in 10 of 10, by psi and chi2_p each time.
The scenario below, retrained with 8 torch seeds (a far larger change than another CPU's rounding):
at most 1 alarm in its 20 batches, and each shift flagged every time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.stats import chi2

from flows.core.augment import Normalizer
from flows.core.calibration import softmax
from flows.core.drift import (
    MIN_IMAGES,
    Reference,
    assess,
    chi_square_p,
    domain_classifier_auc,
    features_and_probs,
    mmd_permutation_test,
    psi,
)
from flows.core.errors import TunedeckError
from flows.core.params import MonitorParams

SIZE = 32
CLASSES = ["horizontal", "vertical", "diagonal", "checker", "disc"]


def synthetic_images(n: int, seed: int, classes: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 NHWC images of stripes (3 orientations), checks or a disc in a warm colour on a dark
    ground, under heavy noise (a tiny model reaches ~90 %, not 100 %), and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(range(len(CLASSES)) if classes is None else classes, n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    freq = 2 * np.pi / rng.uniform(4, 9, n)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    patterns = [np.sin(freq * yy + phase), np.sin(freq * xx + phase), np.sin(freq * (xx + yy) / np.sqrt(2) + phase),
                np.sin(freq * xx + phase) * np.sin(freq * yy + phase)]
    cy, cx = rng.uniform(8, 24, (2, n))[:, :, None, None]
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < rng.uniform(5, 10, n)[:, None, None] ** 2
    for c, pattern in enumerate(patterns):
        mask = np.where((labels == c)[:, None, None], pattern > 0, mask)
    fg = rng.uniform([150, 80, 0], [255, 200, 120], (n, 3))[:, None, None, :]
    bg = rng.uniform(0, 60, (n, 3))[:, None, None, :]
    img = bg + 0.4 * mask[..., None] * (fg - bg) + rng.normal(0, 80, (n, SIZE, SIZE, 3))
    return np.clip(img, 0, 255).astype(np.uint8), labels.astype(np.int64)


@pytest.fixture(scope="module")
def trained():
    """test_resnet trained for 4 epochs on 1000 synthetic images (~2 s on CPU), and its Normalizer."""
    import timm

    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in synthetic_images(1000, 1000))
    model = timm.create_model("test_resnet", num_classes=len(CLASSES))
    norm = Normalizer(model.pretrained_cfg["mean"], model.pretrained_cfg["std"], torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 50):
            idx = order[start:start + 50]
            loss = torch.nn.functional.cross_entropy(model(norm(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), norm


@pytest.fixture(scope="module")
def reference(trained) -> Reference:
    """250 held-out images of the training distribution, as the evaluate stage would save them."""
    x, y = synthetic_images(250, 10_000)
    features, probs = features_and_probs(*trained, x, 64)
    return Reference.of(features, probs, y, CLASSES)


def score(trained, reference, x, y=None):
    return assess(reference, *features_and_probs(*trained, x, 64), y, MonitorParams())


def one_sentence(message: str) -> bool:
    return message.endswith(".") and "\n" not in message and not any(f". {c}" in message for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


# features and probabilities


def test_features_and_probs_match_the_model_whatever_the_batch_size(trained):
    model, norm = trained
    x, _ = synthetic_images(37, 1)
    features, probs = features_and_probs(model, norm, x, 8, temperature=2.0)
    again, _ = features_and_probs(model, norm, x, 64, temperature=2.0)
    with torch.no_grad():
        logits = model(norm(torch.from_numpy(x))).numpy()
    assert features.shape == (37, model.num_features) and features.dtype == np.float32
    assert np.allclose(probs, softmax(logits, 2.0), atol=1e-5) and np.allclose(probs.sum(axis=1), 1.0)
    assert np.allclose(features, again, atol=1e-4)
    assert not model.training


def test_features_and_probs_of_no_images_are_empty_with_the_right_widths(trained):
    features, probs = features_and_probs(*trained, np.zeros((0, SIZE, SIZE, 3), np.uint8), 8)
    assert features.shape == (0, trained[0].num_features) and probs.shape == (0, len(CLASSES))


# the verdict of the default thresholds


def test_batches_of_the_training_distribution_rarely_raise_an_alarm(trained, reference):
    alarms = [score(trained, reference, *synthetic_images(100, 20_000 + b)) for b in range(20)]
    assert sum(r.drifted for r in alarms) <= 1, [r.flagged() for r in alarms if r.drifted]


def blurred(x: np.ndarray) -> np.ndarray:
    return np.clip(gaussian_filter(x.astype(np.float64), (0, 1.0, 1.0, 0)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shift", ["blurred", "inverted", "one class missing"])
def test_each_shift_is_flagged(trained, reference, shift):
    x, _ = synthetic_images(100, 30_000, classes=[0, 2, 3, 4] if shift == "one class missing" else None)
    x = {"blurred": blurred(x), "inverted": 255 - x}.get(shift, x)
    report = score(trained, reference, x)
    assert report.drifted, report.to_dict()


def test_a_report_lists_every_statistic_and_accuracy_only_with_labels(trained, reference):
    x, y = synthetic_images(60, 40_000)
    unlabelled, labelled = score(trained, reference, x), score(trained, reference, x, y)
    names = ["mmd_p", "domain_auc", "psi", "chi2_p", "confidence_drop"]
    assert [s.name for s in unlabelled.statistics] == names
    assert [s.name for s in labelled.statistics] == [*names, "accuracy_drop"]
    data = json.loads(json.dumps(labelled.to_dict()))
    assert data["n_images"] == 60 and data["drifted"] == any(s["flagged"] for s in data["statistics"])
    assert labelled.flagged() == [s.name for s in labelled.statistics if s.flagged]


def test_a_small_batch_holds_the_effect_sizes_to_their_noise_floor(trained, reference):
    """20 images over 5 classes: PSI's sampling noise alone reaches chi2(4) quantile x (1/20 + 1/250)."""
    small = score(trained, reference, synthetic_images(MIN_IMAGES, 41_000)[0]).get("psi")
    large = score(trained, reference, synthetic_images(400, 42_000)[0]).get("psi")
    assert small.threshold == pytest.approx(chi2.ppf(0.999, 4) * (1 / 20 + 1 / 250)) and small.threshold > 0.25
    assert large.threshold == MonitorParams().psi


# the statistics on their own


def mmd2_by_definition(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD², pair by pair, with the kernel the test uses (pooled standardising, median heuristic)."""
    z = np.concatenate([x, y])
    z = (z - z.mean(0)) / z.std(0)
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    k = np.exp(-d2 / (2 * np.median(d2[np.triu_indices(len(z), 1)])))
    m, n = len(x), len(y)
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    return ((kxx.sum() - m) / (m * (m - 1)) + (kyy.sum() - n) / (n * (n - 1)) - 2 * kxy.mean())


def test_mmd_equals_its_definition_and_p_is_k_plus_1_over_n_plus_1():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(15, 4)), rng.normal(0.3, 1.0, size=(11, 4))
    stat, p = mmd_permutation_test(x, y, 99)
    assert stat == pytest.approx(mmd2_by_definition(x, y), rel=1e-9)
    assert 0 < p <= 1 and p * 100 == pytest.approx(round(p * 100))


def test_mmd_p_is_about_uniform_under_the_null_and_tiny_for_a_shift():
    rng = np.random.default_rng(1)
    null = np.array([mmd_permutation_test(rng.normal(size=(30, 5)), rng.normal(size=(40, 5)), 199, seed)[1]
                     for seed in range(60)])
    assert 0.35 < null.mean() < 0.65 and (null < 0.1).mean() < 0.25 and (null > 0.9).mean() < 0.25
    _, shifted = mmd_permutation_test(rng.normal(size=(50, 5)), rng.normal(1.0, 1.0, size=(50, 5)), 199)
    assert shifted == 1 / 200  # the smallest p 199 permutations can give, never 0


def test_domain_auc_is_a_coin_flip_for_one_distribution_and_near_1_for_two():
    rng = np.random.default_rng(2)
    assert abs(domain_classifier_auc(rng.normal(size=(200, 20)), rng.normal(size=(200, 20))) - 0.5) < 0.15
    assert domain_classifier_auc(rng.normal(size=(1000, 20)), rng.normal(2.0, 1.0, size=(50, 20))) > 0.99


def test_psi_is_0_for_equal_mixes_and_matches_a_hand_computation():
    assert psi([50, 30, 20], [100, 60, 40]) == pytest.approx(0.0, abs=1e-12)
    assert psi([50, 50], [25, 75]) == pytest.approx(0.25 * np.log(2) + 0.25 * np.log(1.5))
    p, q = np.array([10, 0.5]) / 10.5, np.array([5, 5]) / 10  # an empty bin counts as half an image
    assert psi([10, 0], [5, 5]) == pytest.approx(np.sum((q - p) * np.log(q / p)))


def test_chi_square_p_matches_a_hand_computation_and_ignores_classes_empty_in_both():
    expected = chi2.sf(4 * 10**2 / 20, 1)  # every cell 10 away from its expected 20, 1 degree of freedom
    assert chi_square_p([30, 10], [10, 30]) == pytest.approx(expected)
    assert chi_square_p([30, 0, 10], [10, 0, 30]) == pytest.approx(expected)
    assert chi_square_p([50, 30, 20], [50, 30, 20]) == pytest.approx(1.0)
    assert chi_square_p([40, 0], [25, 0]) == 1.0  # one class left: nothing to compare


# the reference and the one-sentence errors


def test_reference_of_counts_predictions_and_survives_a_round_trip(tmp_path):
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    ref = Reference.of(np.arange(8, dtype=np.float32).reshape(4, 2), probs, np.array([0, 1, 1, 2]), ["a", "b", "c"])
    assert ref.class_counts.tolist() == [2, 1, 1] and ref.accuracy == 0.75
    assert ref.mean_confidence == pytest.approx((0.9 + 0.7 + 0.6 + 0.8) / 4)
    assert Reference.of(ref.features, probs, None, ["a", "b", "c"]).accuracy is None
    ref.save(tmp_path / "reference")
    back = Reference.load(tmp_path / "reference")
    assert np.array_equal(back.features, ref.features) and back.class_counts.tolist() == [2, 1, 1]
    assert (back.mean_confidence, back.accuracy, back.classes) == (ref.mean_confidence, 0.75, ["a", "b", "c"])
    assert np.allclose(back.probs, probs) and back.labels.tolist() == [0, 1, 1, 2], "what label-free estimates fit on"
    (tmp_path / "reference" / "probs.npy").unlink()  # a reference saved before the estimates existed
    older = Reference.load(tmp_path / "reference")
    assert older.probs is None
    from flows.ship.monitor import estimates

    batch = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1]])
    assert estimates(older, batch, np.array([0, 0])) == {"accuracy": 0.5}, "measured, never estimated from nothing"
    now = estimates(back, batch, None)
    assert set(now) == {"estimated_accuracy", "priors"} and set(now["priors"]) == {"a", "b", "c"}
    assert all(e.low <= e.value <= e.high for e in now["estimated_accuracy"].values())


@pytest.mark.parametrize(("name", "content"), [("summary.json", b"{not json"), ("features.npy", b""),
                                              ("features.npy", b"\x93NUMPY truncated"), ("probs.npy", b"")])
def test_a_missing_or_damaged_reference_is_one_sentence_naming_the_evaluate_stage(tmp_path, name, content):
    with pytest.raises(TunedeckError, match="dvc repro evaluate") as missing:
        Reference.load(tmp_path / "nowhere")
    Reference.of(np.zeros((3, 2), np.float32), np.eye(3), None, ["a", "b", "c"]).save(tmp_path / "ref")
    (tmp_path / "ref" / name).write_bytes(content)
    with pytest.raises(TunedeckError, match=f"{name} is damaged.*dvc repro evaluate") as damaged:
        Reference.load(tmp_path / "ref")
    assert one_sentence(str(missing.value)) and one_sentence(str(damaged.value))


@pytest.mark.parametrize(("features", "probs", "labels", "says"), [
    (np.zeros((MIN_IMAGES - 1, 8)), np.full((MIN_IMAGES - 1, 3), 1 / 3), None, f"at least {MIN_IMAGES}"),
    (np.zeros((30, 9)), np.full((30, 3), 1 / 3), None, "different model"),
    (np.zeros((30, 8)), np.full((30, 4), 1 / 4), None, "4 classes"),
    (np.zeros((30, 8)), np.full((30, 3), 1 / 3), np.zeros(29, int), "one label per image"),
])
def test_a_batch_that_cannot_be_compared_is_one_sentence(features, probs, labels, says):
    rng = np.random.default_rng(3)
    ref = Reference.of(rng.normal(size=(50, 8)).astype(np.float32), np.eye(3)[rng.integers(0, 3, 50)], None, ["a", "b", "c"])
    with pytest.raises(TunedeckError, match=says) as raised:
        assess(ref, features, probs, labels, MonitorParams())
    assert one_sentence(str(raised.value))
