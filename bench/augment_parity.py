"""Accuracy at equal epochs: our tensor augmentation against a loop with timm's default train transform.

Photo-like JPEGs (500x375: a shape per class, at a random place, size, angle and colour, on a
textured background with noise), one split for every run. Each seed trains resnet18 from
scratch on both sides, the same epochs, optimizer, schedule, batch and precision:

  ours       the Trainer on the prepared split: train stored at data.store_size, random-resized
             crops (timm's scale and ratio) and flips on tensors, scored on the prepared val split
  reference  ImageFolder + timm.data.create_transform(size, is_training=True) (random-resized
             crop, flip, colour jitter 0.4) in a DataLoader with persistent workers, scored with
             timm's eval transform on the same val files

Prints val accuracy per seed and mean ± std of each; passes when ours >= reference mean - 1 std.
Usage: python bench/augment_parity.py [--seeds 3] [--epochs 4] [--images 1200] [--size 64] [--store 128]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.core.distributed import World  # noqa: E402
from flows.core.params import parse_params  # noqa: E402
from flows.core.prepare import load_manifest, load_split, prepare  # noqa: E402
from flows.core.scoring import score  # noqa: E402
from flows.core.speed import autocast  # noqa: E402
from flows.core.split import stratified_split  # noqa: E402
from flows.core.trainer import Trainer  # noqa: E402

SHAPES = ("disc", "square", "triangle", "ring")


def shape_photos(folder: Path, n: int, seed: int = 0, width: int = 500, height: int = 375) -> Path:
    """n JPEGs in one folder per shape: the shape at a random place, size, angle and colour on a textured background.

    The shape stands out from its background (its colour is the background's mean pushed away
    by 90-160 per channel) and is large (radius 20-40 % of the shorter side), so resnet18 can
    learn the task from scratch in a few epochs; where it sits, its size and its angle vary, so
    the crops and flips still matter.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        c = i % len(SHAPES)
        angle, freq = rng.uniform(0, 2 * math.pi, 2), rng.uniform(0.01, 0.05, 2)
        mean = rng.uniform(60, 200, 3)
        bg = np.stack([np.sin(xx * freq[0] + angle[0]) * 30 + mean[0],
                       np.cos(yy * freq[1] + angle[1]) * 30 + mean[1],
                       (xx + yy - (width + height) / 2) * rng.uniform(-0.1, 0.1) + mean[2]], -1)
        r = rng.uniform(0.2, 0.4) * height
        cx, cy = width / 2 + rng.uniform(-0.3, 0.3) * height, height / 2 + rng.uniform(-0.2, 0.2) * height
        t = rng.uniform(0, 2 * math.pi)
        dx, dy = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t), -(xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
        d = np.hypot(dx, dy)
        mask = {
            "disc": d < r,
            "square": np.maximum(abs(dx), abs(dy)) < r * 0.8,
            "triangle": (dy < r * 0.5) & (dy > -r + abs(dx) * 1.7),
            "ring": (d < r) & (d > r * 0.6),
        }[SHAPES[c]]
        colour = np.where(mean > 128, mean - rng.uniform(90, 160, 3), mean + rng.uniform(90, 160, 3))
        img = np.where(mask[..., None], colour, bg) + rng.normal(0, 12, (height, width, 3))
        (folder / SHAPES[c]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / SHAPES[c] / f"{i:05d}.jpg", quality=90)
    return folder


def params_for(source: Path, args, seed: int = 42, precision: str = "auto"):
    """The run's params: a timm model (--model, resnet18) from scratch, train stored at --store with random-resized crops and flips."""
    return parse_params({
        "base": {"device": "cpu", "seed": seed},
        "data": {"source": str(source), "image_size": args.size, "store_size": args.store, "val_fraction": 0.2,
                 "test_fraction": 0.05},
        "model": {"name": args.model, "pretrained": args.pretrained},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": args.lr, "hflip": 0.5, "crop_scale": [0.08, 1.0],
                  "precision": precision, "scheduler": "cosine"},
    })


def ours(params, prepared: Path) -> tuple[float, float]:
    """(val accuracy of the last epoch's model, scored in fp32; seconds): the Trainer's own loop, no best-epoch pick."""
    tic = time.perf_counter()
    trainer = Trainer(params, load_manifest(prepared), prepared, torch.device("cpu"), World(), None)
    for epoch in range(params.train.epochs):
        trainer._epoch(epoch, 0, None, None, "")
        trainer.scheduler.step(epoch + 1)
    val_x, val_y = load_split(prepared, "val")
    trainer.model.eval()
    _, acc, _ = score(trainer.model, trainer.norm, val_x, val_y, 256)
    return acc, time.perf_counter() - tic


def split_files(source: Path, params) -> dict[str, list[tuple[str, int]]]:
    """The (path, label) lists of prepare's split of source (same listing and stratified_split)."""
    folders = sorted(p for p in source.iterdir() if p.is_dir())
    files = [(str(p), i) for i, f in enumerate(folders) for p in sorted(f.rglob("*")) if p.is_file()]
    labels = np.array([label for _, label in files])
    split = stratified_split(labels, params.data.val_fraction, params.data.test_fraction, 42, None)
    return {name: [files[i] for i in idx] for name, idx in split.items()}


class Files(torch.utils.data.Dataset):
    """(path, label) pairs through a transform, as torchvision's ImageFolder loads them."""

    def __init__(self, items, transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def reference(params, files, args, seed: int) -> tuple[float, float]:
    """(val accuracy, seconds) of a timm-train.py-style loop with timm's default train transform."""
    from timm.data import create_transform
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from flows.core.speed import resolve_precision
    from flows.core.transfer import param_groups

    tic = time.perf_counter()
    torch.manual_seed(seed)
    from flows.core.model import build_model

    model, _ = build_model(params.model, len(SHAPES))  # the same starting weights as ours
    model = model.to(memory_format=torch.channels_last)
    cfg = params.train
    opt = create_optimizer_v2(param_groups(model, cfg), opt=cfg.optimizer, lr=cfg.lr)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=cfg.epochs, min_lr=cfg.lr * 0.01, warmup_lr=cfg.lr * 0.01)
    dtype = resolve_precision(cfg.precision, torch.device("cpu")).dtype
    loader = torch.utils.data.DataLoader(
        Files(files["train"], create_transform(args.size, is_training=True)), batch_size=cfg.batch_size, shuffle=True,
        drop_last=True, num_workers=args.workers, persistent_workers=args.workers > 0, prefetch_factor=2 if args.workers else None,
        generator=torch.Generator().manual_seed(seed),
    )
    for epoch in range(cfg.epochs):
        model.train()
        for x, y in loader:
            with autocast(torch.device("cpu"), dtype):
                loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step(epoch + 1)
    model.eval()
    val = torch.utils.data.DataLoader(Files(files["val"], create_transform(args.size, is_training=False)), batch_size=256)
    right = 0
    with torch.inference_mode():
        for x, y in val:
            right += int((model(x).argmax(1) == y).sum())
    return right / len(files["val"]), time.perf_counter() - tic


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--pretrained", default=False, help="a weights file (e.g. the demo's weights/demo-source.safetensors)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--store", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers (persistent)")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        source = shape_photos(Path(tmp) / "photos", args.images)
        prepare(params_for(source, args), Path(tmp) / "prepared")
        files = split_files(source, params_for(source, args))
        for seed in range(args.seeds):  # side by side, alternating
            params = params_for(source, args, seed=seed)
            acc, sec = ours(params, Path(tmp) / "prepared")
            results["ours"].append(acc)
            ref, ref_sec = reference(params, files, args, seed)
            results["reference"].append(ref)
            print(f"seed {seed}: ours {acc:.3f} ({sec:.0f} s)  reference {ref:.3f} ({ref_sec:.0f} s)", flush=True)
    ref_mean = statistics.mean(results["reference"])
    ref_std = statistics.stdev(results["reference"]) if args.seeds > 1 else 0.0
    ours_mean = statistics.mean(results["ours"])
    print(f"ours {mean_std(results['ours'])}   reference (timm transform) {mean_std(results['reference'])}")
    print(json.dumps({"seeds": args.seeds, "epochs": args.epochs, "images": args.images, "size": args.size, "store": args.store,
                      "ours": results["ours"], "reference": results["reference"],
                      "ours_mean": round(ours_mean, 4), "reference_mean": round(ref_mean, 4), "reference_std": round(ref_std, 4),
                      "parity": ours_mean >= ref_mean - ref_std, "torch": torch.__version__,
                      "load_average": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
