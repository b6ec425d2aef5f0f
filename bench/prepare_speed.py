"""Prepare's decoding, measured: images per second on 1 thread and on every core, per core, and peak memory.

Photo-like JPEGs (500x375, smooth gradients and noise) decoded to params' image size, the way
the prepare stage does (decode_stream, a bounded window), side by side: one thread, threads on
every core (what prepare does), and the same work in a pool of processes (to see whether the GIL
holds threads back; the pool's start is counted, as it would be in prepare). Usage:
python bench/prepare_speed.py [--images 2000] [--size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.core.images import decode_stream, hash_and_decode, usable_cores  # noqa: E402


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


def rate(source: Path, size: int, workers: int, processes: bool) -> float:
    """Images per second through decode_stream (threads), or the same work in a pool of processes."""
    tic = time.perf_counter()
    if processes:
        paths = sorted(p for p in source.rglob("*") if p.is_file())
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            n = sum(1 for _ in pool.map(hash_and_decode, paths, [(size,)] * len(paths), chunksize=16))
    else:
        n = len(decode_stream(source, (size,), lambda images: None, workers=workers).labels)
    return n / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        source = photos(Path(tmp) / "photos", args.images)
        ways = {"1 thread": (1, False), f"threads, {cores} cores": (cores + 4, False), f"processes, {cores} cores": (cores, True)}
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):  # side by side, alternating
            for name, (workers, processes) in ways.items():
                rates[name].append(rate(source, args.size, workers, processes))
    med = {name: statistics.median(r) for name, r in rates.items()}
    one = med["1 thread"]
    for name, value in med.items():
        print(f"{name:22s} {value:7.1f} img/s  ({value / (1 if name == '1 thread' else cores):6.1f} img/s per core, {value / one:.2f}x one thread)")
    threads, procs = med[f"threads, {cores} cores"], med[f"processes, {cores} cores"]
    print(f"processes / threads: {procs / threads:.2f}x")
    print(json.dumps({"images": args.images, "size": args.size, "cores": cores, "one_thread_img_s": round(one, 1),
                      "threads_img_s": round(threads, 1), "processes_img_s": round(procs, 1),
                      "per_core_img_s": round(procs / cores, 1), "processes_over_threads": round(procs / threads, 2),
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


if __name__ == "__main__":
    main()
