"""Does bf16 autocast cost accuracy on this CPU? Val accuracy over seeds, bf16 against fp32, one split.

The photo-like shapes of bench/augment_parity.py, a timm model (--model, resnet18) from scratch, the Trainer's own loop
(random-resized crops and flips on tensors), each seed trained in fp32 and in bf16 autocast and
scored in fp32. Prints mean ± std of each, the difference with a 95 % interval, and whether the
bf16 mean lies within the fp32 runs' spread (fp32 mean ± 1 std).
Usage: python bench/precision_accuracy.py [--seeds 5] [--epochs 4] [--images 1200] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.augment_parity import mean_std, ours, params_for, shape_photos  # noqa: E402
from flows.core.prepare import prepare  # noqa: E402
from flows.core.speed import cpu_bf16  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--pretrained", default=False, help="a weights file (e.g. the demo's weights/demo-source.safetensors)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--store", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    acc: dict[str, list[float]] = {"fp32": [], "bf16": []}
    secs: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        source = shape_photos(Path(tmp) / "photos", args.images)
        prepared = Path(tmp) / "prepared"
        prepare(params_for(source, args), prepared)
        for seed in range(args.seeds):  # side by side: both precisions per seed
            for precision in acc:
                a, s = ours(params_for(source, args, seed=seed, precision=precision), prepared)
                acc[precision].append(a)
                secs[precision].append(s)
            print(f"seed {seed}: fp32 {acc['fp32'][-1]:.3f} ({secs['fp32'][-1]:.0f} s)  "
                  f"bf16 {acc['bf16'][-1]:.3f} ({secs['bf16'][-1]:.0f} s)", flush=True)
    diffs = [b - f for b, f in zip(acc["bf16"], acc["fp32"], strict=True)]
    half = 2.776 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) == 5 else 1.96 * statistics.stdev(diffs) / len(diffs) ** 0.5
    f_mean, f_std, b_mean = statistics.mean(acc["fp32"]), statistics.stdev(acc["fp32"]), statistics.mean(acc["bf16"])
    print(f"fp32 {mean_std(acc['fp32'])}   bf16 {mean_std(acc['bf16'])}   "
          f"bf16 - fp32 {statistics.mean(diffs):+.3f} (95 % interval ± {half:.3f})")
    print(json.dumps({
        "cpu_bf16": cpu_bf16(), "torch": torch.__version__, "seeds": args.seeds, "epochs": args.epochs, "images": args.images,
        "size": args.size, "store": args.store, "fp32": acc["fp32"], "bf16": acc["bf16"],
        "diff_mean": round(statistics.mean(diffs), 4), "diff_ci95_half": round(half, 4),
        "bf16_within_fp32_spread": abs(b_mean - f_mean) <= f_std,
        "median_run_s": {k: round(statistics.median(v), 1) for k, v in secs.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
