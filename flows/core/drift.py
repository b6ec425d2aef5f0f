"""Drift of a batch of new images against a model's reference: the statistics, and their verdict.

Two views of the same batch. The backbone's pooled features say whether the images look like the
reference's (an MMD two-sample test with permutations, and how well a classifier tells them
apart); the predicted classes say whether the model sees the same mix of classes (PSI and a
chi-square test of the two histograms) with the same confidence (and accuracy, when labelled).
Each shift shows in some of them, rarely in all: a vanished class moves the class mix more than
the features, a blurred or recoloured batch moves the features first. The thresholds live in
``params.yaml`` (``monitor:``); their false-alarm rate and what each catches are measured in
tests/unit/test_drift.py's docstring.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from flows.core.calibration import softmax
from flows.core.errors import TunedeckError
from flows.core.params import MonitorParams

MIN_IMAGES = 20  # below this the permutation test and 5-fold AUC are noise, not evidence
MAX_SAMPLE = 2000  # per side: the pooled kernel matrix stays <= 4000^2 floats; power is set by the smaller side anyway
PCA_DIMS = 50  # the domain classifier's input: enough for any real shift, few enough for 5 folds in a second
PERMUTATION_CHUNK = 1000  # relabellings scored per matrix product: 32 MB of indicators at the largest sample
NOISE_LEVEL = 0.001  # an effect-size threshold is never below what noise reaches this often (noise_floors)


def features_and_probs(model, norm, images: np.ndarray, batch_size: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(pooled pre-logit features, float32 N×D; class probabilities softmax(logits / T), N×C) of uint8 NHWC images.

    The logits come from ``forward_head`` on the same feature map, so they are ``model(x)`` whatever
    the head holds before its last layer (norm, MLP, dropout), which a bare ``get_classifier()`` is not.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, logits = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = norm(torch.as_tensor(np.ascontiguousarray(images[start:start + batch_size])).to(device))
                fmap = model.forward_features(x)
                feats.append(model.forward_head(fmap, pre_logits=True).flatten(1).float().cpu().numpy())
                logits.append(model.forward_head(fmap).float().cpu().numpy())
    finally:
        model.train(was_training)
    if not feats:
        width = getattr(model, "head_hidden_size", None) or model.num_features
        return np.zeros((0, width), np.float32), np.zeros((0, model.num_classes), np.float64)
    return np.concatenate(feats), softmax(np.concatenate(logits), temperature)


@dataclass
class Reference:
    """What new batches are compared with: the held-out images as the model saw them (eval/reference/)."""

    features: np.ndarray  # N×D float32 pooled backbone features
    class_counts: np.ndarray  # predicted-class histogram, length C
    mean_confidence: float  # mean top-class probability (temperature applied)
    accuracy: float | None  # on the held-out labels; None when unlabelled
    classes: list[str] = field(default_factory=list)
    probs: np.ndarray | None = None  # N×C class probabilities (temperature applied): what label-free estimates fit on
    labels: np.ndarray | None = None  # N true classes; None when unlabelled (or a reference written before them)

    @classmethod
    def of(cls, features: np.ndarray, probs: np.ndarray, labels: np.ndarray | None, classes: list[str]) -> Reference:
        """The reference of held-out images from their features and probabilities (and labels, when known)."""
        pred = np.asarray(probs).argmax(axis=1)
        accuracy = float((pred == np.asarray(labels)).mean()) if labels is not None and len(labels) else None
        return cls(np.asarray(features, np.float32), np.bincount(pred, minlength=len(classes)).astype(np.int64),
                   float(np.asarray(probs).max(axis=1).mean()) if len(pred) else 0.0, accuracy, list(classes),
                   np.asarray(probs, np.float32), None if labels is None else np.asarray(labels, np.int64))

    def save(self, folder: Path) -> None:
        """Write features.npy and summary.json into folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "features.npy", self.features.astype(np.float32))
        if self.probs is not None:
            np.save(folder / "probs.npy", self.probs.astype(np.float32))
        if self.labels is not None:
            np.save(folder / "labels.npy", self.labels.astype(np.int64))
        summary = {"n_images": len(self.features), "feature_dim": int(self.features.shape[1]), "classes": self.classes,
                   "class_counts": [int(c) for c in self.class_counts], "mean_confidence": self.mean_confidence,
                   "accuracy": self.accuracy}
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))

    @classmethod
    def load(cls, folder: Path) -> Reference:
        """The reference saved in folder; one sentence when it is missing or damaged."""
        folder = Path(folder)
        if not (folder / "features.npy").is_file() or not (folder / "summary.json").is_file():
            raise TunedeckError(f"no drift reference in {folder} (features.npy and summary.json): "
                                "run the evaluate stage (`dvc repro evaluate`) to write it.")
        try:
            summary = json.loads((folder / "summary.json").read_text())
            counts, classes = np.asarray(summary["class_counts"], np.int64), [str(c) for c in summary["classes"]]
            confidence, accuracy = float(summary["mean_confidence"]), summary["accuracy"]
            accuracy = None if accuracy is None else float(accuracy)
        except (OSError, ValueError, KeyError, TypeError):
            raise _damaged(folder / "summary.json", "not JSON with class_counts, classes, mean_confidence and accuracy") from None
        try:
            features = np.load(folder / "features.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            raise _damaged(folder / "features.npy", "not a readable .npy array") from None
        if features.ndim != 2 or counts.shape != (len(classes),):
            raise _damaged(folder, f"features of shape {features.shape}, {counts.size} class counts for {len(classes)} classes")
        probs, labels = _optional(folder / "probs.npy"), _optional(folder / "labels.npy")
        if probs is not None and probs.shape != (len(features), len(classes)):
            raise _damaged(folder / "probs.npy", f"of shape {probs.shape} for {len(features)} images of {len(classes)} classes")
        if labels is not None and labels.shape != (len(features),):
            raise _damaged(folder / "labels.npy", f"of shape {labels.shape} for {len(features)} images")
        return cls(features.astype(np.float32), counts, confidence, accuracy, classes, probs, labels)


def _optional(path: Path) -> np.ndarray | None:
    """An array a reference written before it existed lacks (label-free estimates then say so)."""
    if not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        raise _damaged(path, "not a readable .npy array") from None


def _damaged(path: Path, what: str) -> TunedeckError:
    return TunedeckError(f"the drift reference {path} is damaged ({what}): "
                         "run the evaluate stage again (`dvc repro evaluate --force`) to rewrite it.")


def _sample(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    """At most limit rows of x, drawn without replacement (all of them, in order, when there are fewer)."""
    return x if len(x) <= limit else x[np.sort(rng.choice(len(x), limit, replace=False))]


def _standardise(pooled: np.ndarray) -> np.ndarray:
    """Each feature centred and scaled by its pooled std, a dead feature left at 0.

    Pooled ReLU features differ in scale by orders of magnitude, and a Euclidean kernel would see
    only the few loudest; scaled, every feature counts. Statistics of the pooled sample keep the
    permutation test exact (they do not change when the rows are relabelled).
    """
    pooled = pooled.astype(np.float64)
    std = pooled.std(axis=0)
    constant = std <= 1e-12 * std.max()  # a dead feature's std is rounding error: dividing would amplify it
    return (pooled - pooled.mean(axis=0)) / np.where(constant, np.inf, std)


def _kernel(z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The RBF kernel matrix of the rows of z, bandwidth by the median heuristic (median pairwise distance)."""
    sq = (z * z).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    np.fill_diagonal(d2, 0.0)
    few = rng.choice(len(z), min(len(z), 1000), replace=False)  # 500k pairs pin the median as well as n²/2, far faster
    pairs = d2[np.ix_(few, few)][np.triu_indices(len(few), 1)]
    return np.exp(-d2 / (2.0 * max(float(np.median(pairs)), 1e-12)))


def _mmd2(kernel: np.ndarray, labels: np.ndarray, m: int) -> np.ndarray:
    """Unbiased MMD² for each column of labels (n×P indicators of the m rows taken as the first sample).

    With s the indicator, sum_XX = sᵀKs, sum_XY = rᵀs − sᵀKs, sum_YY = 1ᵀK1 − 2rᵀs + sᵀKs (r = K1): one
    matrix product scores every permutation at once. K's diagonal is 1, removed from both within sums.
    """
    n = len(kernel)
    k = n - m
    rows = kernel.sum(axis=1)
    xx = (labels * (kernel @ labels)).sum(axis=0)
    rs = rows @ labels
    yy = rows.sum() - 2.0 * rs + xx
    return (xx - m) / (m * (m - 1)) + (yy - k) / (k * (k - 1)) - 2.0 * (rs - xx) / (m * k)


def mmd_permutation_test(ref: np.ndarray, new: np.ndarray, permutations: int, seed: int = 0) -> tuple[float, float]:
    """(unbiased MMD², permutation p-value) of two samples of feature vectors (rows), after pooled standardising.

    The p-value is (k + 1) / (permutations + 1), k the relabellings of the pooled sample whose MMD² is
    at least the observed one: exact under the null, never 0, resolution 1/(permutations + 1).
    """
    rng = np.random.default_rng(seed)
    ref, new = _sample(np.asarray(ref), MAX_SAMPLE, rng), _sample(np.asarray(new), MAX_SAMPLE, rng)
    m, n = len(ref), len(ref) + len(new)
    if m < 2 or n - m < 2:
        raise ValueError("MMD needs at least 2 vectors in each sample")
    kernel = _kernel(_standardise(np.concatenate([ref, new])), rng)
    observed = float(_mmd2(kernel, (np.arange(n) < m).astype(np.float64)[:, None], m)[0])
    at_least = 0
    for start in range(0, permutations, PERMUTATION_CHUNK):  # chunks bound the n×P indicator matrix
        count = min(PERMUTATION_CHUNK, permutations - start)
        labels = np.zeros((count, n))
        np.put_along_axis(labels, rng.random((count, n)).argsort(axis=1)[:, :m], 1.0, axis=1)
        at_least += int(np.sum(_mmd2(kernel, labels.T, m) >= observed))
    return observed, (at_least + 1) / (permutations + 1)


def domain_classifier_auc(ref: np.ndarray, new: np.ndarray, seed: int = 0) -> float:
    """Cross-validated ROC AUC of a logistic regression telling new rows from reference rows (0.5: indistinguishable).

    Standardised, reduced by PCA to at most PCA_DIMS (fitted inside each fold), L2-regularised and
    class-weighted; the larger side is subsampled to at most 4× the smaller so a big reference does
    not drown the batch. AUC ignores the class ratio, so the threshold means the same for any sizes.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    small = min(len(ref), len(new))
    ref = _sample(np.asarray(ref), min(MAX_SAMPLE, 4 * small), rng)
    new = _sample(np.asarray(new), min(MAX_SAMPLE, 4 * small), rng)
    x = np.concatenate([ref, new]).astype(np.float64)
    y = np.r_[np.zeros(len(ref)), np.ones(len(new))]
    folds = min(5, len(ref), len(new))
    if folds < 2:
        raise ValueError("a domain classifier needs at least 2 vectors in each sample")
    dims = min(PCA_DIMS, x.shape[1], int(len(x) * (folds - 1) / folds) - 1)
    clf = make_pipeline(StandardScaler(), PCA(dims, svd_solver="full"),
                        LogisticRegression(C=0.1, class_weight="balanced", max_iter=1000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(clf, x, y, cv=cv, scoring="roc_auc")))


def psi(ref_counts: np.ndarray, new_counts: np.ndarray, eps: float = 0.5) -> float:
    """Population stability index Σ (q − p) ln(q / p) of two histograms (p: reference, q: new proportions).

    An empty bin counts as eps images (half an image by default) on its side, not as 0, which
    would make the log infinite: a class gone from a batch of n still weighs ln(p·n/eps), large
    for a common class and small for a rare one that a small batch may simply not contain.
    """
    def proportions(counts: np.ndarray) -> np.ndarray:
        counts = np.asarray(counts, np.float64)
        counts = np.where(counts > 0, counts, eps)
        return counts / counts.sum()

    p, q = proportions(ref_counts), proportions(new_counts)
    return float(np.sum((q - p) * np.log(q / p)))


def chi_square_p(ref_counts: np.ndarray, new_counts: np.ndarray) -> float:
    """p-value of the chi-square test that both histograms come from one distribution (the 2×C table).

    Classes empty in both are dropped (they carry no evidence, and an all-zero column has no
    expected count); with fewer than 2 classes left there is nothing to compare: 1.0.
    """
    from scipy.stats import chi2_contingency

    table = np.array([ref_counts, new_counts], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 1.0
    return float(chi2_contingency(table, correction=False).pvalue)


@dataclass(frozen=True)
class Statistic:
    """One drift statistic of a batch against its threshold."""

    name: str
    value: float
    threshold: float
    flagged: bool
    direction: Literal["above", "below"]  # the side of the threshold where the value flags drift


@dataclass(frozen=True)
class DriftReport:
    """Every statistic of one batch, and the verdict: drifted when any is flagged."""

    statistics: list[Statistic]
    drifted: bool
    n_images: int

    def flagged(self) -> list[str]:
        """The names of the statistics that crossed their thresholds."""
        return [s.name for s in self.statistics if s.flagged]

    def get(self, name: str) -> Statistic | None:
        """The statistic called name, or None when the batch did not have it (accuracy_drop without labels)."""
        return next((s for s in self.statistics if s.name == name), None)

    def to_dict(self) -> dict:
        """Plain data (JSON-ready)."""
        return {"drifted": self.drifted, "n_images": self.n_images, "statistics": [asdict(s) for s in self.statistics]}


def _stat(name: str, value: float, threshold: float, direction: Literal["above", "below"]) -> Statistic:
    flagged = value > threshold if direction == "above" else value < threshold
    return Statistic(name, float(value), float(threshold), bool(flagged), direction)


def _check(reference: Reference, features: np.ndarray, probs: np.ndarray, labels: np.ndarray | None) -> None:
    """One sentence on the first input that cannot be compared with the reference."""
    if len(features) < MIN_IMAGES:
        raise TunedeckError(f"the batch has {len(features)} images that decode; drift needs at least {MIN_IMAGES}: "
                            "add images to the folder, or monitor a larger batch.")
    if len(reference.features) < MIN_IMAGES:
        raise TunedeckError(f"the drift reference holds only {len(reference.features)} images (at least {MIN_IMAGES} needed): "
                            "hold out more images (data.val_fraction, data.test_fraction) and rerun `dvc repro evaluate`.")
    if features.ndim != 2 or features.shape[1] != reference.features.shape[1]:
        raise TunedeckError(f"the new images' features have {features.shape[-1]} dimensions but the reference's have "
                            f"{reference.features.shape[1]}: the reference was saved by a different model; monitor with "
                            "the model whose evaluate stage wrote it, or rerun `dvc repro evaluate`.")
    if probs.shape != (len(features), len(reference.classes)):
        raise TunedeckError(f"the model scores {probs.shape[-1]} classes but the reference has {len(reference.classes)}: "
                            "the reference was saved by a different model; rerun `dvc repro evaluate` for this one.")
    if labels is not None and len(labels) != len(features):
        raise TunedeckError(f"{len(labels)} labels for {len(features)} images: give one label per image, or none.")


def noise_floors(reference: Reference, counts: np.ndarray, confidence: np.ndarray, accuracy: float | None = None) -> dict[str, float]:
    """What the effect-size statistics reach by sampling noise alone in at most 1 batch in 1000 (one-sided 99.9 %).

    PSI ≈ χ²(k − 1)·(1/n + 1/m) between two samples of one distribution, and a mean's difference is
    about normal (accuracy's variance from the pooled accuracy, as in the two-proportion test). With
    no drift at all, a batch of 20 over 10 classes passes PSI 0.25 about 86 % of the time, and a
    batch of 100 still 4 % (against a 250-image reference).
    assess lifts each threshold to its floor, so small batches cannot raise alarms on noise alone,
    while for large ones the configured thresholds apply unchanged.
    """
    from scipy.stats import chi2, norm

    n, m = len(confidence), max(int(reference.class_counts.sum()), 1)
    z, scale = norm.ppf(1 - NOISE_LEVEL), 1.0 / n + 1.0 / m
    classes = max(int(((reference.class_counts > 0) | (counts > 0)).sum()), 2)
    pooled = reference.accuracy if reference.accuracy is not None else 1.0
    if accuracy is not None:
        pooled = (pooled * m + accuracy * n) / (m + n)
    return {"psi": float(chi2.ppf(1 - NOISE_LEVEL, classes - 1) * scale),
            "confidence_drop": float(z * confidence.std(ddof=1) * np.sqrt(scale)),
            "accuracy_drop": float(z * np.sqrt(pooled * (1 - pooled) * scale))}


def assess(reference: Reference, features: np.ndarray, probs: np.ndarray, labels: np.ndarray | None,
           thresholds: MonitorParams, seed: int = 0) -> DriftReport:
    """Every drift statistic of a batch (its features, probabilities and optional labels) against the reference.

    The tests (mmd_p, domain_auc, chi2_p) use their thresholds as configured; the effect sizes (psi,
    confidence_drop, accuracy_drop) use the larger of theirs and their noise floor for this batch's
    size (noise_floors), and each Statistic carries the threshold it was held to.
    """
    features, probs = np.asarray(features), np.asarray(probs)
    _check(reference, features, probs, labels)
    _, mmd_p = mmd_permutation_test(reference.features, features, thresholds.permutations, seed)
    counts = np.bincount(probs.argmax(axis=1), minlength=len(reference.classes))
    confidence = probs.max(axis=1)
    labelled = labels is not None and reference.accuracy is not None
    accuracy = float((probs.argmax(axis=1) == np.asarray(labels)).mean()) if labelled else None
    floor = noise_floors(reference, counts, confidence, accuracy)
    stats = [
        _stat("mmd_p", mmd_p, thresholds.mmd_p, "below"),
        _stat("domain_auc", domain_classifier_auc(reference.features, features, seed), thresholds.domain_auc, "above"),
        _stat("psi", psi(reference.class_counts, counts), max(thresholds.psi, floor["psi"]), "above"),
        _stat("chi2_p", chi_square_p(reference.class_counts, counts), thresholds.chi2_p, "below"),
        _stat("confidence_drop", reference.mean_confidence - float(confidence.mean()),
              max(thresholds.confidence_drop, floor["confidence_drop"]), "above"),
    ]
    if accuracy is not None:
        stats.append(_stat("accuracy_drop", reference.accuracy - accuracy,
                           max(thresholds.accuracy_drop, floor["accuracy_drop"]), "above"))
    return DriftReport(stats, any(s.flagged for s in stats), len(features))
