"""Training throughput, measured side by side in one run (same model, batch, device; medians).

  synthetic  forward+backward+step on random tensors already in memory (timm benchmark.py's method)
  ours       the Trainer on the decoded-once split (uint8 arrays, augmentation on tensors)
  reference  a plain loop as timm's train.py runs on an image folder: torchvision ImageFolder,
             PIL decode + timm's training transform every epoch, DataLoader with timm's default
             4 workers

Prints a final JSON line with efficiency = ours / synthetic (goal >= 0.90 on CPU) and
speedup_vs_reference = ours / reference (goal >= 1.3 on CPU).
Usage: python bench/train_throughput.py [--model resnet18] [--size 64] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
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
from flows.core.prepare import load_manifest, prepare  # noqa: E402
from flows.core.speed import autocast  # noqa: E402
from flows.core.trainer import Trainer  # noqa: E402


def photos(folder: Path, n: int, classes: int = 4, width: int = 500, height: int = 375) -> None:
    """n JPEG 'photos' (ImageNet's typical 500x375 by default; smooth colour fields plus noise) in class folders."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        c = i % classes
        base = np.stack([np.sin(xx / (20 + 5 * c) + i) * 90 + 120, np.cos(yy / 30 + c) * 80 + 110, (xx + yy) % 255], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"c{c}" / f"{i:04d}.jpg", quality=90)


def params_for(source: Path, args) -> object:
    return parse_params({
        "base": {"device": "cpu" if not torch.cuda.is_available() else "auto"},
        "data": {"source": str(source), "image_size": args.size, "val_fraction": 0.0, "test_fraction": 0.05},
        "model": {"name": args.model, "pretrained": False},
        "train": {"epochs": 1, "batch_size": args.batch, "hflip": 0.5, "scheduler": "none", "precision": args.precision,
                  "compile": args.compile},
    })


def synthetic(trainer: Trainer, batch: int, size: int, steps: int) -> float:
    """images/s of forward+backward+step on tensors already on the device."""
    x = torch.randn(batch, 3, size, size, device=trainer.device)
    if trainer.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(trainer.classes), (batch,), device=trainer.device)
    loss_fn = torch.nn.CrossEntropyLoss()
    for i in range(steps + 2):
        if i == 2:
            sync(trainer.device)
            tic = time.perf_counter()
        with autocast(trainer.device, trainer.dtype):  # the same precision as ours
            loss = loss_fn(trainer.forward(x), y)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    sync(trainer.device)
    return steps * batch / (time.perf_counter() - tic)


def ours(trainer: Trainer) -> float:
    """images/s of one training epoch of the Trainer on the prepared split."""
    trainer._epoch(0, 0, None, None, "")  # warm
    sync(trainer.device)
    return trainer._epoch(1, 0, None, None, "")["samples_per_s"]


def reference(folder: Path, trainer: Trainer, args) -> float:
    """images/s of a plain ImageFolder + timm transform + DataLoader loop."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    data = ImageFolder(str(folder), transform=create_transform(args.size, is_training=True))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True)
    model, opt, loss_fn = trainer.forward, trainer.optimizer, torch.nn.CrossEntropyLoss()
    seen, tic = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(trainer.device), y.to(trainer.device)
        if trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(trainer.device, trainer.dtype):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += len(y)
    sync(trainer.device)
    return seen / (time.perf_counter() - tic)


PEAK_FLOPS = {torch.bfloat16: 989e12, torch.float16: 989e12, None: 67e12}  # H100/H200 SXM dense


def train_flops_per_image(trainer: Trainer, size: int) -> float:
    """Training FLOPs per image: 3x one forward pass, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size, device=trainer.device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        trainer.model(x)
    return 3.0 * counter.get_total_flops()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class GpuUtilisation:
    """NVML GPU utilisation sampled every 0.2 s while a measurement runs (None without NVML)."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[int] = []
        self.handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception:  # noqa: BLE001 - no NVML means no figure, not a failure
                self.handle = None

    def __enter__(self):
        import threading

        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _sample(self) -> None:
        while self.handle is not None and not self.stop.wait(0.2):
            import pynvml

            self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--photo-size", default="500x375", help="source JPEG size, WxH (ImageNet's typical 500x375)")
    parser.add_argument("--workers", type=int, default=4, help="reference DataLoader workers (timm's default 4)")
    parser.add_argument("--json-out", type=Path, help="also write the result JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        width, height = (int(v) for v in args.photo_size.split("x"))
        photos(folder, args.images, width=width, height=height)
        params = params_for(folder, args)
        prepare(params, Path(tmp) / "prepared")
        trainer = Trainer(params, load_manifest(Path(tmp) / "prepared"), Path(tmp) / "prepared", torch.device(params.base.device if params.base.device != "auto" else "cuda"), World(), None)
        steps = max(4, len(trainer.train_y) // args.batch)
        results: dict[str, list[float]] = {"synthetic": [], "ours": [], "reference": []}
        utilisation = GpuUtilisation(trainer.device)
        for r in range(args.rounds):
            results["synthetic"].append(synthetic(trainer, args.batch, args.size, steps))
            with utilisation:
                results["ours"].append(ours(trainer))
            results["reference"].append(reference(folder, trainer, args))
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f} img/s" for k, v in results.items()), flush=True)
        flops = train_flops_per_image(trainer, args.size)
    med = {k: statistics.median(v) for k, v in results.items()}
    efficiency = statistics.median(o / s for o, s in zip(results["ours"], results["synthetic"], strict=True))
    speedup = statistics.median(o / r for o, r in zip(results["ours"], results["reference"], strict=True))
    if efficiency > 1.05:
        print(f"warning: efficiency {efficiency:.2f} > 1.05 means the machine was busy during a round; rerun", flush=True)
    result = {
        "device": device_name(trainer.device), "model": args.model, "size": args.size, "photo_size": args.photo_size, "batch": args.batch,
        "precision": str(trainer.dtype), "channels_last": trainer.channels_last, "compile": args.compile,
        "rounds": args.rounds, "median_images_per_s": {k: round(v, 1) for k, v in med.items()},
        "train_gflops_per_image": round(flops / 1e9, 3),
        "mfu": round(med["ours"] * flops / PEAK_FLOPS[trainer.dtype], 4) if trainer.device.type == "cuda" else None,
        "nvml_utilisation_pct": utilisation.median(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "efficiency": round(efficiency, 3),  # median of per-round ratios: one busy round cannot skew it
        "speedup_vs_reference": round(speedup, 3),
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
