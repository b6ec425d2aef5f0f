"""The evaluate stage's work: test accuracy, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flows.contracts import ModelCard
from flows.core.devices import resolve_device
from flows.core.params import Params, save_resolved
from flows.core.prepare import load_split


def load_trained(models: Path, device):
    """The trained model from models/model.safetensors (its metadata says how to rebuild it), and models/model.json."""
    from flows.core.model_file import load_model

    model, _ = load_model(models / "model.safetensors", device)
    return model, ModelCard.read(models)


def per_class_scores(labels: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of every class."""
    scores = {}
    for i, name in enumerate(classes):
        tp = int(((pred == i) & (labels == i)).sum())
        predicted, actual = int((pred == i).sum()), int((labels == i).sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    return scores


def evaluate(params: Params, prepared: Path, models: Path, out: Path) -> dict:
    """Score the trained model on the test split, with its calibration.

    Writes out/metrics.json (headline), out/per_class.json, and two DVC plots: out/confusion.json
    and out/reliability.json (accuracy against confidence in 15 bins, temperature applied).
    """
    import torch

    from flows.core.augment import Normalizer
    from flows.core.calibration import calibration_metrics, reliability, softmax
    from flows.core.explain import write_explanations
    from flows.core.scoring import logits_of

    device = resolve_device(params.base.device)
    model, config = load_trained(models, device)
    test_x, test_y = load_split(prepared, "test")
    norm = Normalizer(config.mean, config.std, device)
    logits = logits_of(model, norm, test_x, params.evaluate.batch_size)
    pred = logits.argmax(1) if len(test_y) else np.empty(0, dtype=np.int64)
    classes = config.classes
    per_class = per_class_scores(test_y, pred, classes)
    loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(test_y.astype(np.int64))).item() if len(test_y) else 0.0
    metrics = {
        "accuracy": float((pred == test_y).mean()) if len(test_y) else 0.0,
        "loss": loss,
        "macro_f1": float(np.mean([s["f1"] for s in per_class.values()])),
        "n_test": int(len(test_y)),
        **calibration_metrics(logits, test_y, config.temperature),
    }
    out.mkdir(parents=True, exist_ok=True)
    metrics["gradcam_sanity_rho"] = write_explanations(model, norm, test_x, test_y, pred, classes, out / "explain",
                                                       params.evaluate.explain_images, params.base.seed).mean
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "per_class.json").write_text(json.dumps(per_class, indent=2))
    confusion = [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(test_y.tolist(), pred.tolist(), strict=True)]
    (out / "confusion.json").write_text(json.dumps(confusion))
    (out / "reliability.json").write_text(json.dumps(reliability(softmax(logits, config.temperature), test_y)))
    write_groups(prepared, test_y, softmax(logits, config.temperature), classes, out)
    save_reference(model, norm, prepared, params, config, out / "reference")
    save_resolved(params, out)
    return metrics


def write_groups(prepared: Path, labels: np.ndarray, probs: np.ndarray, classes: list[str], out: Path) -> dict:
    """out/groups.json (per group of data.groups: figures with intervals, the worst group and its gap), its
    headline out/groups_metrics.json (a DVC metric: each attribute's worst-group accuracy and gap, so `dvc exp show`
    and the dashboard get two columns per attribute, not one per group and figure) and out/groups_plot.json; all
    empty when the data declares no groups, so the stage's outputs always exist."""
    from flows.core import groups

    split = groups.load(prepared, "test")
    figures = groups.report(labels, probs, split, classes) if split is not None else {}
    (out / "groups.json").write_text(json.dumps(figures, indent=2))
    (out / "groups_metrics.json").write_text(json.dumps(groups.headline(figures), indent=2))
    (out / "groups_plot.json").write_text(json.dumps(groups.plot_rows(figures)))
    return figures


REFERENCE_MIN = 100  # fewer validation images than this: the test images join them (both are held out)


def save_reference(model, norm, prepared: Path, params: Params, config: ModelCard, folder: Path) -> None:
    """What drift monitoring compares new images with: the held-out images' pooled backbone features,
    predicted-class histogram, mean confidence and accuracy (flows.core.drift.Reference)."""
    from flows.core.drift import Reference, features_and_probs

    images, labels = load_split(prepared, "val")
    if len(labels) < REFERENCE_MIN:
        test_x, test_y = load_split(prepared, "test")
        images, labels = np.concatenate([np.asarray(images), np.asarray(test_x)]), np.concatenate([labels, test_y])
    features, probs = features_and_probs(model, norm, images, params.evaluate.batch_size, config.temperature)
    Reference.of(features, probs, labels, config.classes).save(folder)
