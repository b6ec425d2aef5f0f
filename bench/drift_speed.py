"""Drift scoring's cost: seconds to compare a batch's features with a reference's, split by statistic.

Pooled-CNN-like features (non-negative, scales over two orders of magnitude), 500 reference vs
500 new vectors of dimension 512 by default: the MMD permutation test at the default number of
permutations (params.yaml monitor.permutations) and the cross-validated domain classifier, the
two statistics whose cost grows with the batch; the histogram statistics take microseconds.
Median of a few rounds. Goal: under 30 s on 2 cores. Usage:
python bench/drift_speed.py [--reference 500] [--new 500] [--dim 512] [--permutations N] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.core.drift import domain_classifier_auc, mmd_permutation_test  # noqa: E402
from flows.core.params import MonitorParams  # noqa: E402


def features(n: int, dim: int, shift: float, seed: int) -> np.ndarray:
    """n pooled-ReLU-like feature vectors (float32), their means moved by shift standard deviations."""
    rng = np.random.default_rng(seed)
    scales = np.random.default_rng(0).lognormal(0.0, 1.0, dim)  # one scale per feature, shared by both samples
    return (np.maximum(rng.normal(shift, 1.0, (n, dim)), 0.0) * scales).astype(np.float32)


def timed(fn, *args) -> tuple[float, object]:
    tic = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - tic, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=int, default=500)
    parser.add_argument("--new", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--permutations", type=int, default=MonitorParams().permutations)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ref, new = features(args.reference, args.dim, 0.0, 1), features(args.new, args.dim, 0.05, 2)
    mmd, auc = [], []
    for seed in range(args.rounds):
        seconds, (_, p) = timed(mmd_permutation_test, ref, new, args.permutations, seed)
        mmd.append(seconds)
        seconds, score = timed(domain_classifier_auc, ref, new, seed)
        auc.append(seconds)
    med_mmd, med_auc = statistics.median(mmd), statistics.median(auc)
    total = med_mmd + med_auc
    print(f"{args.reference} reference vs {args.new} new vectors of dimension {args.dim}, {os.cpu_count()} cores")
    print(f"{f'MMD, {args.permutations} permutations':28s}{med_mmd:6.2f} s  ({med_mmd / total:.0%})  p = {p:.3g}")
    print(f"{'domain classifier, 5-fold':28s}{med_auc:6.2f} s  ({med_auc / total:.0%})  AUC = {score:.3f}")
    print(f"{'total':28s}{total:6.2f} s  (goal: under 30 s on 2 cores)")
    print(json.dumps({"reference": args.reference, "new": args.new, "dim": args.dim, "permutations": args.permutations,
                      "cores": os.cpu_count(), "mmd_s": round(med_mmd, 3), "domain_auc_s": round(med_auc, 3),
                      "total_s": round(total, 3), "rounds": args.rounds}))


if __name__ == "__main__":
    main()
