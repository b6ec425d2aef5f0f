"""Batch prediction, measured: images/s of predict() on JPEG files against the model's forward pass alone.

  predict   photo-like JPEGs (500x375) through flows.core.predict.predict: decoded by prepare's
            decode_image in worker threads, overlapped with the model, softmax and top-k
  forward   the same model on random normalised tensors already in memory: the backend's own
            forward (same batch, size, device, inference mode, channels_last and autocast)
  ratio     predict / forward, per round (the two side by side), median; goal >= 0.9

A random-weight timm model (resnet18 by default), saved as a tunedeck model file. Shared CPUs
are noisy (a round can run at half speed), hence side-by-side rounds and the median of their
ratios. At 224 px the model dominates and decoding hides behind it; at 64 px decoding a 500x375
JPEG costs about as much CPU as the model, so the ratio there measures decode_image, not the
overlap. Usage:
python bench/predict_throughput.py [--model resnet18] [--size 224] [--batch 64] [--images 512] [--rounds 5]
    [--workers 0] [--device cpu]
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
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.prepare_speed import photos  # noqa: E402
from flows.contracts import ModelMeta  # noqa: E402
from flows.core.model_file import save_model  # noqa: E402
from flows.core.predict import TorchBackend, list_images, predict  # noqa: E402


def model_file(folder: Path, name: str, size: int, classes: int = 10) -> Path:
    """A random-weight (seeded) model of timm's name, as the train stage would save it."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=classes)
    meta = ModelMeta(model_name=name, classes=[f"c{i}" for i in range(classes)], image_size=size,
                     mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], interpolation="bicubic", data_version="bench")
    path = folder / "model.safetensors"
    save_model(path, {k: v.contiguous() for k, v in model.state_dict().items()}, meta)
    return path


def forward_rate(backend: TorchBackend, n: int, batch: int) -> float:
    """Images/s of the model alone on normalised input tensors already on the device, made as predict makes them."""
    size = backend.meta.image_size
    rng = np.random.default_rng(0)
    images = np.stack([backend.prepare(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)])
    x = backend.tensor(images)
    batches = [x[: min(batch, n - start)] for start in range(0, n, batch)]
    sync = torch.cuda.synchronize if backend.device.type == "cuda" else (lambda: None)
    sync()
    tic = time.perf_counter()
    for xb in batches:
        backend.forward(xb)
    sync()
    return n / (time.perf_counter() - tic)


def predict_rate(backend: TorchBackend, images: list[Path], batch: int, workers: int) -> float:
    tic = time.perf_counter()
    out = predict(images, backend, batch_size=batch, top_k=3, workers=workers)
    assert len(out.rows) == len(images) and not out.failures
    return len(images) / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (0: one per core)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        images = list_images(photos(Path(tmp) / "photos", args.images))
        backend = TorchBackend(model_file(Path(tmp), args.model, args.size), args.device)
        forward_rate(backend, args.batch, args.batch)  # warm up: first-call allocations and kernel selection
        predict_rate(backend, images[: args.batch], args.batch, args.workers)
        fwd, pred = [], []
        for _ in range(args.rounds):  # side by side, alternating
            fwd.append(forward_rate(backend, len(images), args.batch))
            pred.append(predict_rate(backend, images, args.batch, args.workers))
    ratio = statistics.median(p / f for p, f in zip(pred, fwd, strict=True))
    med_f, med_p = statistics.median(fwd), statistics.median(pred)
    where = f"{args.model} {args.size}px batch {args.batch} on {backend.device} ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"
    print(where)
    print(f"forward only   {med_f:8.1f} img/s   (rounds: {', '.join(f'{r:.0f}' for r in fwd)})")
    print(f"predict        {med_p:8.1f} img/s   (rounds: {', '.join(f'{r:.0f}' for r in pred)})")
    print(f"ratio          {ratio:8.2f}         (median of per-round ratios; goal >= 0.9)")
    print(json.dumps({"model": args.model, "size": args.size, "batch": args.batch, "images": args.images, "rounds": args.rounds,
                      "device": str(backend.device), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "forward_img_s": round(med_f, 1), "predict_img_s": round(med_p, 1), "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
