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
    """The trained model from models/model.json + model.safetensors, and its config."""
    import timm
    from safetensors.torch import load_file

    config = ModelCard.read(models)
    model = timm.create_model(config.model_name, pretrained=False, num_classes=len(config.classes))
    model.load_state_dict(load_file(str(models / "model.safetensors")))
    return model.to(device).eval(), config


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
    """Score the trained model on the test split.

    Writes out/metrics.json (headline), out/per_class.json and out/confusion.json (a DVC plot).
    """
    from flows.core.augment import Normalizer
    from flows.core.scoring import score

    device = resolve_device(params.base.device)
    model, config = load_trained(models, device)
    test_x, test_y = load_split(prepared, "test")
    norm = Normalizer(config.mean, config.std, device)
    loss, accuracy, pred = score(model, norm, test_x, test_y, params.evaluate.batch_size)
    classes = config.classes
    per_class = per_class_scores(test_y, pred, classes)
    metrics = {
        "accuracy": accuracy,
        "loss": loss,
        "macro_f1": float(np.mean([s["f1"] for s in per_class.values()])),
        "n_test": int(len(test_y)),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "per_class.json").write_text(json.dumps(per_class, indent=2))
    confusion = [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(test_y.tolist(), pred.tolist(), strict=True)]
    (out / "confusion.json").write_text(json.dumps(confusion))
    save_resolved(params, out)
    return metrics
