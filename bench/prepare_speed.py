"""Prepare's decoding, measured: images per second on 1 thread and on every core, per core, and peak memory.

Photo-like JPEGs (500x375, smooth gradients and noise) decoded to params' image size, the way
the prepare stage does (decode_stream, a bounded window of threads). Usage:
python bench/prepare_speed.py [--images 600] [--size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.core.images import decode_stream  # noqa: E402


def photos(folder: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs at 500x375 in two class folders."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        base = (np.stack([xx * 255 / 500, yy * 255 / 375, (xx + yy) * 255 / 875], -1) + rng.normal(0, 25, (375, 500, 3)))
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(sub / f"{i:05d}.jpg", quality=90)
    return folder


def rate(source: Path, size: int, workers: int) -> float:
    tic = time.perf_counter()
    decoded = decode_stream(source, (size,), lambda images: None, workers=workers)
    return len(decoded.labels) / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        source = photos(Path(tmp) / "photos", args.images)
        one, every = [], []
        for _ in range(args.rounds):  # side by side, alternating
            one.append(rate(source, args.size, 1))
            every.append(rate(source, args.size, cores + 4))
    med1, medn = statistics.median(one), statistics.median(every)
    print(f"1 thread          {med1:7.1f} img/s")
    print(f"{cores} cores          {medn:7.1f} img/s  ({medn / cores:.1f} img/s per core, {medn / med1:.2f}x one thread)")
    print(json.dumps({"images": args.images, "size": args.size, "cores": cores, "one_thread_img_s": round(med1, 1),
                      "all_cores_img_s": round(medn, 1), "per_core_img_s": round(medn / cores, 1),
                      "scaling": round(medn / med1, 2),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
