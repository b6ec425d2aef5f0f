"""Training throughput and whole-run wall time, like for like, side by side in one run (medians).

  synthetic  forward+backward+step on random tensors already in memory (timm benchmark.py's method)
  ours       the Trainer on the prepared split: train stored at --store px, random-resized crops
             (timm's scale and ratio) and flips on tensors, in the precision train.precision picks
  reference  a loop as timm's train.py runs on an image folder, in a process of its own as train.py
             is (so with glibc's malloc settings as they come; ours has the Trainer's, see
             speed.retain_freed_memory): PIL decode + timm's train transform with the same
             augmentation (random-resized crop + flip; colour jitter off, as ours has none) every
             epoch, a DataLoader with persistent workers and prefetch (kept warm across rounds, as
             timm's loader is), fp32 as train.py without --amp (--reference-precision)

Steady state: img/s of whole epochs (data loading included) after a warm-up epoch, per round.
Whole run (--whole-runs, wall time against wall time, each side in processes of its own):
ours = the prepare, train (--epochs, validation, calibration) and evaluate stage processes, as a
pipeline run starts them (the torch stages through its warm server; --no-warm: without);
reference = one fresh process: imports, a DataLoader and model, --epochs epochs each followed by
a validation pass, as `python train.py` does.
Prints a final JSON line with speedup_vs_reference (steady state) and whole_run_speedup.
Usage: python bench/train_throughput.py [--model resnet18] [--size 64] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.augment_parity import Files, split_files  # noqa: E402
from flows.core.distributed import World  # noqa: E402
from flows.core.params import parse_params  # noqa: E402
from flows.core.prepare import load_manifest, prepare  # noqa: E402
from flows.core.speed import autocast, resolve_precision  # noqa: E402
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


def params_for(source: Path, args, epochs: int = 1) -> object:
    return parse_params(params_dict(source, args, epochs))


def params_dict(source: Path, args, epochs: int = 1) -> dict:
    """The params of ours: args' model, sizes, batch and precision; timm's crop scale and flips."""
    return {
        "base": {"device": "cpu" if not torch.cuda.is_available() else "auto"},
        "data": {"source": str(source), "image_size": args.size, "store_size": args.store, "val_fraction": args.val,
                 "test_fraction": 0.05},
        "model": {"name": args.model, "pretrained": False},
        "train": {"epochs": epochs, "batch_size": args.batch, "hflip": 0.5, "crop_scale": [0.08, 1.0], "scheduler": "none",
                  "precision": args.precision, "compile": args.compile},
    }


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


def ours(trainer: Trainer, epoch: int) -> float:
    """images/s of one whole training epoch of the Trainer on the prepared split."""
    sync(trainer.device)
    return trainer._epoch(epoch, 0, None, None, "")["samples_per_s"]


class Reference:
    """timm's train.py on an image folder: a model, its optimizer and a warm DataLoader, one epoch at a time."""

    def __init__(self, folder: Path, files: list, num_classes: int, device: torch.device, args) -> None:
        import timm
        from timm.data import create_transform

        self.device, self.args = device, args
        self.dtype = resolve_precision(args.reference_precision, device).dtype
        self.model = timm.create_model(args.model, pretrained=False, num_classes=num_classes).to(device, memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        transform = create_transform(args.size, is_training=True, color_jitter=None)  # crop + flip, as ours
        workers = args.workers
        self.loader = torch.utils.data.DataLoader(
            Files(files, transform), batch_size=args.batch, shuffle=True, drop_last=True, num_workers=workers,
            persistent_workers=workers > 0, prefetch_factor=2 if workers else None, pin_memory=device.type == "cuda",
        )

    def epoch(self) -> float:
        """images/s of one epoch, data loading included."""
        self.model.train()
        seen, tic = 0, time.perf_counter()
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.device, self.dtype):
                loss = torch.nn.functional.cross_entropy(self.model(x.contiguous(memory_format=torch.channels_last)), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            seen += len(y)
        sync(self.device)
        return seen / (time.perf_counter() - tic)

    def validate(self, files: list) -> float:
        """Accuracy on files through timm's eval transform, as train.py validates after each epoch."""
        from timm.data import create_transform

        loader = torch.utils.data.DataLoader(Files(files, create_transform(self.args.size, is_training=False)),
                                             batch_size=256, num_workers=self.args.workers)
        self.model.eval()
        right = 0
        with torch.inference_mode(), autocast(self.device, self.dtype):
            for x, y in loader:
                right += int((self.model(x.to(self.device)).argmax(1).cpu() == y).sum())
        return right / max(len(files), 1)


ROOT = Path(__file__).resolve().parents[1]


def whole_ours(folder: Path, tmp: Path, args, warm_stages: bool = True) -> float:
    """Seconds of prepare + train (args.epochs) + evaluate as a pipeline run runs them: one process per stage
    (`python -m flows.stages.<name>` in a project folder), the torch stages through the run's warm server."""
    import yaml

    from flows.stages.warm import WarmStages

    project = tmp / "project"
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params_dict(folder, args, epochs=args.epochs)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEDECK_PREFECT": "off", "TUNEDECK_CHECKPOINTS": str(project / "ckpt")}
    tic = time.perf_counter()
    warm = WarmStages().start() if warm_stages else None  # the pipeline starts it before its first stage
    try:
        for stage in ("prepare", "train", "evaluate"):
            subprocess.run([sys.executable, "-m", f"flows.stages.{stage}"], cwd=project, check=True,
                           env={**env, **(warm.env() if warm else {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - tic
    finally:
        if warm is not None:
            warm.stop()


def whole_reference(folder: Path, split: dict, num_classes: int, tmp: Path, args) -> float:
    """Seconds of the reference's run in a fresh process, as `python train.py` is: its imports, a fresh loader
    and model, args.epochs epochs each with a validation pass."""
    job = tmp / "reference.json"
    job.write_text(json.dumps({"folder": str(folder), "split": split, "num_classes": num_classes, "args": vars(args)},
                              default=str))
    tic = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--reference-run", str(job)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - tic


class ReferenceProcess:
    """The reference's steady state in a process of its own, as train.py runs: an epoch each time it is asked."""

    def __init__(self, folder: Path, split: dict, num_classes: int, tmp: Path, args) -> None:
        job = tmp / "reference-serve.json"
        job.write_text(json.dumps({"folder": str(folder), "split": split, "num_classes": num_classes, "args": vars(args)},
                                  default=str))
        self.proc = subprocess.Popen([sys.executable, __file__, "--reference-serve", str(job)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def epoch(self) -> float:
        """images/s of one epoch of the reference (its DataLoader workers stay warm in between)."""
        self.proc.stdin.write("epoch\n")
        self.proc.stdin.flush()
        while line := self.proc.stdout.readline():
            if line.startswith("img/s "):
                return float(line.split()[1])
        raise RuntimeError(f"the reference process ended with {self.proc.wait()}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def reference_serve(job: Path) -> None:
    """ReferenceProcess's side: the reference's model and warm loader, one epoch per line read."""
    spec = json.loads(job.read_text())
    args = argparse.Namespace(**spec["args"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = Reference(Path(spec["folder"]), spec["split"]["train"], spec["num_classes"], device, args)
    for _ in sys.stdin:
        print(f"img/s {ref.epoch()}", flush=True)


def reference_run(job: Path) -> None:
    """The reference's whole run (whole_reference's process)."""
    spec = json.loads(job.read_text())
    args = argparse.Namespace(**spec["args"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = Reference(Path(spec["folder"]), spec["split"]["train"], spec["num_classes"], device, args)
    for _ in range(args.epochs):
        ref.epoch()
        ref.validate(spec["split"]["val"])


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
    parser.add_argument("--store", type=int, help="train images stored at this side (default: 2 x size, at most the photo's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--val", type=float, default=0.1, help="validation fraction")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of a whole run")
    parser.add_argument("--whole-runs", type=int, default=None, help="whole runs per side (default: 2 on the CPU, 0 on a GPU)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--reference-precision", default="fp32", help="fp32: timm train.py without --amp")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--photo-size", default="500x375", help="source JPEG size, WxH (ImageNet's typical 500x375)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reference DataLoader workers")
    parser.add_argument("--json-out", type=Path, help="also write the result JSON here")
    parser.add_argument("--no-warm", dest="warm", action="store_false", help="whole run: stages without the warm server")
    parser.add_argument("--reference-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference-serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_run:
        return reference_run(args.reference_run)
    if args.reference_serve:
        return reference_serve(args.reference_serve)
    width, height = (int(v) for v in args.photo_size.split("x"))
    args.store = args.store or min(2 * args.size, min(width, height))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    whole_runs = args.whole_runs if args.whole_runs is not None else (2 if device.type == "cpu" else 0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        photos(folder, args.images, classes=3, width=width, height=height)
        params = params_for(folder, args)
        prepare(params, Path(tmp) / "prepared")
        split = split_files(folder, params)
        trainer = Trainer(params, load_manifest(Path(tmp) / "prepared"), Path(tmp) / "prepared", device, World(), None)
        ref = ReferenceProcess(folder, split, len(trainer.classes), Path(tmp), args)
        steps = max(4, len(trainer.train_y) // args.batch)
        ours(trainer, 0)  # warm-up epochs: allocator, oneDNN primitives, the reference's workers
        ref.epoch()
        results: dict[str, list[float]] = {"synthetic": [], "ours": [], "reference": []}
        utilisation = GpuUtilisation(trainer.device)
        for r in range(args.rounds):
            results["synthetic"].append(synthetic(trainer, args.batch, args.size, steps))
            with utilisation:
                results["ours"].append(ours(trainer, r + 1))
            results["reference"].append(ref.epoch())
            print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f} img/s" for k, v in results.items()), flush=True)
        ref.close()
        flops = train_flops_per_image(trainer, args.size)
        del trainer
        whole: dict[str, list[float]] = {"ours": [], "ours_no_warm": [], "reference": []}
        for r in range(whole_runs):  # alternating, wall time against wall time
            whole["ours"].append(whole_ours(folder, Path(tmp) / "run", args, args.warm))
            whole["ours_no_warm"].append(whole_ours(folder, Path(tmp) / "run", args, False))
            whole["reference"].append(whole_reference(folder, split, len(class_folders(folder)), Path(tmp), args))
            print(f"whole run {r + 1}: " + "  ".join(f"{k} {v[-1]:.1f} s" for k, v in whole.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    efficiency = statistics.median(o / s for o, s in zip(results["ours"], results["synthetic"], strict=True))
    speedup = statistics.median(o / r for o, r in zip(results["ours"], results["reference"], strict=True))
    if efficiency > 1.05:
        print(f"warning: efficiency {efficiency:.2f} > 1.05 means the machine was busy during a round; rerun", flush=True)
    chosen = resolve_precision(args.precision, device)
    result = {
        "device": device_name(device), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "model": args.model, "size": args.size, "store": args.store, "photo_size": args.photo_size, "batch": args.batch,
        "images": args.images, "precision": chosen.name, "precision_reason": chosen.reason,
        "reference_precision": args.reference_precision, "reference_workers": args.workers, "compile": args.compile,
        "rounds": args.rounds, "median_images_per_s": {k: round(v, 1) for k, v in med.items()},
        "train_gflops_per_image": round(flops / 1e9, 3),
        "mfu": round(med["ours"] * flops / PEAK_FLOPS[chosen.dtype], 4) if device.type == "cuda" else None,
        "nvml_utilisation_pct": utilisation.median(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "efficiency": round(efficiency, 3),  # median of per-round ratios: one busy round cannot skew it
        "speedup_vs_reference": round(speedup, 3),
        "whole_run_s": {k: [round(x, 1) for x in v] for k, v in whole.items()},
        "warm": args.warm,
        "whole_run_speedup": round(statistics.median(r / o for o, r in zip(whole["ours"], whole["reference"], strict=True)), 3)
        if whole_runs else None,
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


if __name__ == "__main__":
    main()
