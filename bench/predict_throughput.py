"""Batch prediction, measured per backend side by side: images/s of predict() on JPEG files against that backend's
forward pass alone, and its agreement with torch.

  backends  torch (the model file), onnx (ONNX Runtime) and openvino (OpenVINO) on the export stage's ONNX file, and
            both on its int8 model (ONNX Runtime's static quantisation, calibrated on 64 of the decoded photos)
  predict   photo-like JPEGs (500x375) through flows.core.predict.predict: decoded by prepare's decode_image in
            worker threads, overlapped with the model, softmax and top-k
  forward   the same model on normalised inputs already in memory: the backend's own forward (same batch and size)
  ratio     predict / forward, per round (the two side by side), median; goal >= 0.9
  parity    against torch's rows on the same photos: top-1 agreement, and the largest top-k probability difference
            (the int8 models' accuracy cost on a test split is measured at export: export/int8/report.json)

A random-weight timm model (resnet18 by default, its head scaled so top-1 is never a near tie), saved as a tunedeck
model file. Shared CPUs are noisy (a round can run at half speed), hence side-by-side rounds and the median of their
ratios. At 224 px the model dominates and decoding hides behind it; at 64 px decoding a 500x375 JPEG costs about as
much CPU as the model. Usage:
python bench/predict_throughput.py [--model resnet18] [--size 224] [--batch 64] [--images 512] [--rounds 5]
    [--workers 0] [--device cpu] [--backends torch,onnx,openvino,onnx-int8,openvino-int8]
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
from flows.core.errors import TunedeckError  # noqa: E402
from flows.core.export import export_onnx  # noqa: E402
from flows.core.images import decode_image  # noqa: E402
from flows.core.model_file import save_model  # noqa: E402
from flows.core.predict import OnnxBackend, TorchBackend, list_images, predict  # noqa: E402
from flows.core.runtimes import quantize_int8  # noqa: E402


def model_file(folder: Path, name: str, size: int, classes: int = 10) -> Path:
    """A random-weight (seeded) model of timm's name, as the train stage would save it; its head scaled up."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=classes)
    with torch.no_grad():
        model.get_classifier().weight.mul_(20)
    meta = ModelMeta(model_name=name, classes=[f"c{i}" for i in range(classes)], image_size=size,
                     mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], interpolation="bicubic", data_version="bench")
    path = folder / "model.safetensors"
    save_model(path, {k: v.contiguous() for k, v in model.state_dict().items()}, meta)
    return path


def make_backends(folder: Path, model_path: Path, names: list[str], device: str, calibration: list[Path]) -> dict:
    """Each named backend on the same model: the model file itself, or its ONNX export (and int8 model)."""
    out, onnx_path, int8_path = {}, folder / "model.onnx", folder / "int8.onnx"
    try:
        if any(n != "torch" for n in names):
            export_onnx(model_path, onnx_path, 18)
        if any(n.endswith("-int8") for n in names):
            ref = OnnxBackend(onnx_path)
            x = np.stack([ref.prepare(decode_image(p, ref.meta.image_size)) for p in calibration])
            quantize_int8(onnx_path, int8_path, np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    except (ImportError, TunedeckError) as exc:  # a GPU image without onnx or onnxruntime: torch alone
        print(f"skipped every backend but torch: {exc}")
        names = [n for n in names if n == "torch"]
    for name in names:
        runtime, _, int8 = name.partition("-")
        try:
            out[name] = TorchBackend(model_path, device) if name == "torch" else OnnxBackend(
                int8_path if int8 else onnx_path, runtime="openvino" if runtime == "openvino" else "onnxruntime")
        except (ImportError, TunedeckError) as exc:
            print(f"skipped {name}: {exc}")
    return out


def forward_rate(backend, n: int, batch: int) -> float:
    """Images/s of the model alone on normalised inputs already in memory, made as predict makes them."""
    size = backend.meta.image_size
    rng = np.random.default_rng(0)
    images = np.stack([backend.prepare(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)])
    if isinstance(backend, TorchBackend):
        x, run = backend.tensor(images), backend.forward
    else:
        x, run = np.ascontiguousarray(images.transpose(0, 3, 1, 2)), backend.classifier.logits
    batches = [x[: min(batch, n - start)] for start in range(0, n, batch)]
    cuda = isinstance(backend, TorchBackend) and backend.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    tic = time.perf_counter()
    for xb in batches:
        run(xb)
    sync()
    return n / (time.perf_counter() - tic)


def predict_rate(backend, images: list[Path], batch: int, workers: int) -> tuple[float, list]:
    tic = time.perf_counter()
    out = predict(images, backend, batch_size=batch, top_k=3, workers=workers)
    assert len(out.rows) == len(images) and not out.failures
    return len(images) / (time.perf_counter() - tic), out.rows


def parity(rows: list, torch_rows: list) -> tuple[float, float]:
    """Top-1 agreement with torch's rows, and the largest difference of a top-k probability (same top-k classes)."""
    agree = [a.label == b.label for a, b in zip(rows, torch_rows, strict=True)]
    diffs = [abs(p - q) for a, b in zip(rows, torch_rows, strict=True) if a.topk_labels == b.topk_labels
             for p, q in zip(a.topk_probs, b.topk_probs, strict=True)]
    return float(np.mean(agree)), max(diffs, default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="decoding threads (0: one per core)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", default="torch,onnx,openvino,onnx-int8,openvino-int8")
    args = parser.parse_args()
    wanted = args.backends.split(",")
    if unknown := [n for n in wanted if n not in ("torch", "onnx", "openvino", "onnx-int8", "openvino-int8")]:
        parser.error(f"--backends: unknown {', '.join(unknown)} (torch, onnx, openvino, onnx-int8, openvino-int8)")
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = list_images(photos(Path(tmp) / "photos", args.images))
        backends = make_backends(Path(tmp), model_file(Path(tmp), args.model, args.size), wanted, args.device, images[:64])
        names = list(backends)
        fwd: dict[str, list[float]] = {n: [] for n in names}
        pred: dict[str, list[float]] = {n: [] for n in names}
        for backend in backends.values():  # warm up: first-call allocations and kernel selection
            forward_rate(backend, args.batch, args.batch)
            predict_rate(backend, images[: args.batch], args.batch, args.workers)
        for _ in range(args.rounds):  # side by side, alternating
            for name, backend in backends.items():
                fwd[name].append(forward_rate(backend, len(images), args.batch))
                rate, rows[name] = predict_rate(backend, images, args.batch, args.workers)
                pred[name].append(rate)
    where = f"{args.model} {args.size}px batch {args.batch}, {args.images} JPEGs, {args.rounds} rounds ({os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"
    print(where)
    print(f"{'backend':14} {'forward img/s':>14} {'predict img/s':>14} {'ratio':>6} {'top-1 = torch':>14} {'max |dp|':>9}")
    report = []
    for name in names:
        ratio = statistics.median(p / f for p, f in zip(pred[name], fwd[name], strict=True))
        agree, worst = parity(rows[name], rows[names[0]]) if "torch" in names else (float("nan"), float("nan"))
        f, p = statistics.median(fwd[name]), statistics.median(pred[name])
        print(f"{name:14} {f:14.1f} {p:14.1f} {ratio:6.2f} {agree:14.4f} {worst:9.1e}")
        report.append({"backend": name, "forward_img_s": round(f, 1), "predict_img_s": round(p, 1),
                       "ratio": round(ratio, 3), "top1_agreement": agree, "max_prob_diff": worst})
    print(json.dumps({"model": args.model, "size": args.size, "batch": args.batch, "images": args.images,
                      "rounds": args.rounds, "cores": os.cpu_count(), "backends": report}))


if __name__ == "__main__":
    main()
