"""How close the monitor's label-free estimates come to a batch's true accuracy, per kind of shift (issue 24).

A resnet18 is trained from scratch through the project's own stages (prepare, train, evaluate) on the
bundled digits (10 classes, 32 px); its held-out validation split is the monitor's reference, as in a
real run. Batches are drawn from the test split, which neither training nor the reference saw, and
shifted: none, blur, darker, noise, one class missing, a 70 % / rest class mix. For each batch the
true accuracy (its labels) is set against ATC and the calibrated confidence (flows.core.estimate),
and BBSE's class priors against the true mix; each model seed is a fresh split and training.
It also times what the estimates add to scoring a batch of 500 (features, probabilities and the drift
statistics), side by side, medians.

    python bench/estimate_accuracy.py [--seeds 3] [--batches 20] [--size 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flows.core.augment import Normalizer  # noqa: E402
from flows.core.drift import Reference, assess, features_and_probs  # noqa: E402
from flows.core.estimate import label_free  # noqa: E402
from flows.core.evaluate import evaluate  # noqa: E402
from flows.core.model_file import load_model  # noqa: E402
from flows.core.params import parse_params  # noqa: E402
from flows.core.prepare import load_split, prepare  # noqa: E402
from flows.core.train import train  # noqa: E402
from flows.demo.digits import write_digits  # noqa: E402

SHIFTS = ("none", "blur", "darker, mild", "darker", "noise, mild", "noise", "class missing", "70% one class")


def shifted(images: np.ndarray, shift: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 N×H×W×3 images with a covariate shift (the label shifts are in how a batch is drawn)."""
    if shift == "blur":
        return np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(1.2))) for i in images])
    if shift.startswith("darker"):
        return (images.astype(np.float32) * (0.7 if shift.endswith("mild") else 0.45)).astype(np.uint8)
    if shift.startswith("noise"):
        sigma = 20 if shift.endswith("mild") else 45
        return np.clip(images + rng.normal(0, sigma, images.shape), 0, 255).astype(np.uint8)
    return images


def draw(labels: np.ndarray, shift: str, size: int, rng: np.random.Generator, classes: int) -> np.ndarray:
    """Indices of one batch: uniform from the pool, or with a class missing, or 70 % of class 0."""
    if shift == "class missing":
        return rng.choice(np.flatnonzero(labels != 0), size)
    if shift == "70% one class":
        share = np.where(np.arange(classes) == 0, 0.7, 0.3 / (classes - 1))
        wanted = rng.choice(classes, size, p=share)
        return np.array([rng.choice(np.flatnonzero(labels == c)) for c in wanted])
    return rng.choice(len(labels), size, replace=size > len(labels))


def trained_model(folder: Path, seed: int, epochs: int, auto_augment: str | None = None):
    """Digits → prepare → train → evaluate (its reference) in folder; the model, normaliser, temperature,
    reference and the test split (the batches' pool)."""
    write_digits(folder / "digits", range(10))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["base"].update(seed=seed, device="cpu")
    raw["data"].update(source=str(folder / "digits"), val_fraction=0.2, test_fraction=0.4, limit_per_class=None)
    raw["model"].update(name="resnet18", pretrained=False)
    raw["train"].update(epochs=epochs, batch_size=32, freeze_epochs=0, head_lr_scale=1.0, crop_padding=2,
                        auto_augment=auto_augment)
    params = parse_params(raw)
    prepare(params, folder / "prepared")
    train(params, folder / "prepared", folder / "models")
    evaluate(params, folder / "prepared", folder / "models", folder / "eval")
    model, meta = load_model(folder / "models" / "model.safetensors")
    norm = Normalizer(meta.mean, meta.std, "cpu")
    x, y = (np.array(a) for a in load_split(folder / "prepared", "test", mmap=False))
    return model, norm, meta, Reference.load(folder / "eval" / "reference"), x, y, params


def one_seed(seed: int, args) -> tuple[dict[str, list[tuple[float, float, float]]], list[float], list[float]]:
    with tempfile.TemporaryDirectory() as scratch:
        model, norm, meta, reference, x, y, params = trained_model(Path(scratch), seed, args.epochs, args.auto_augment)
        rng = np.random.default_rng(seed)
        rows: dict[str, list[tuple[float, float, float]]] = {s: [] for s in SHIFTS}
        for shift in SHIFTS:
            for _ in range(args.batches):
                idx = draw(y, shift, args.size, rng, len(meta.classes))
                _, probs = features_and_probs(model, norm, shifted(x[idx], shift, rng), 256, meta.temperature)
                accuracy, _ = label_free(reference.probs, reference.labels, probs)
                truth = float((probs.argmax(axis=1) == y[idx]).mean())
                rows[shift].append((truth, accuracy["atc"].value, accuracy["confidence"].value))
        bbse_errors = []
        for _ in range(args.batches):
            idx = draw(y, "70% one class", 500, rng, len(meta.classes))
            _, probs = features_and_probs(model, norm, x[idx], 256, meta.temperature)
            _, priors = label_free(reference.probs, reference.labels, probs)
            truth = np.bincount(y[idx], minlength=len(meta.classes)) / len(idx)
            bbse_errors.append(float(np.abs(np.array([p.value for p in priors]) - truth).max()))
        base, extra = [], []
        idx = draw(y, "none", 500, rng, len(meta.classes))
        for _ in range(args.timing_rounds):
            tic = time.perf_counter()
            features, probs = features_and_probs(model, norm, x[idx], 256, meta.temperature)
            assess(reference, features, probs, None, params.monitor)
            base.append(time.perf_counter() - tic)
            tic = time.perf_counter()
            label_free(reference.probs, reference.labels, probs)
            extra.append(time.perf_counter() - tic)
        return rows, bbse_errors, [b / a for a, b in zip(base, extra, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=20, help="batches per shift and seed")
    parser.add_argument("--size", type=int, default=200, help="images per batch")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--auto-augment", help="train with timm's augmentation policy, e.g. rand-m9-mstd0.5")
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float, float]]] = {s: [] for s in SHIFTS}
    bbse_errors, overhead, per_seed = [], [], []
    for seed in range(1, args.seeds + 1):
        seeded, errors, ratios = one_seed(seed, args)
        for shift in SHIFTS:
            rows[shift] += seeded[shift]
        per_seed.append({s: np.mean([abs(t - a) for t, a, _ in seeded[s]]) for s in SHIFTS})
        bbse_errors += errors
        overhead += ratios
        print(f"seed {seed}: in-distribution accuracy {np.mean([t for t, _, _ in seeded['none']]):.3f}", flush=True)
    print(f"\n{args.seeds} seeds x {args.batches} batches of {args.size} per shift; absolute error in points, "
          "mean over batches (± std of the per-seed means for ATC)")
    print(f"{'shift':<16} {'true acc':>8} {'ATC err':>14} {'ATC bias':>8} {'conf. err':>9} {'conf. bias':>10}")
    for shift in SHIFTS:
        truth = np.array([t for t, _, _ in rows[shift]])
        atc_signed = (np.array([a for _, a, _ in rows[shift]]) - truth) * 100
        conf_signed = (np.array([c for _, _, c in rows[shift]]) - truth) * 100
        spread = statistics.pstdev([100 * s[shift] for s in per_seed]) if len(per_seed) > 1 else 0.0
        print(f"{shift:<16} {truth.mean():>8.3f} {np.abs(atc_signed).mean():>8.2f} ± {spread:<4.2f} "
              f"{atc_signed.mean():>+8.2f} {np.abs(conf_signed).mean():>9.2f} {conf_signed.mean():>+10.2f}")
    print(f"\nBBSE on batches of 500 at 70 % one class: worst class's error, mean {100 * np.mean(bbse_errors):.2f} "
          f"points, max {100 * np.max(bbse_errors):.2f} over {len(bbse_errors)} batches")
    print(f"estimates and BBSE over scoring a batch of 500: median {100 * statistics.median(overhead):.2f} % extra "
          f"({len(overhead)} rounds side by side)")


if __name__ == "__main__":
    main()
