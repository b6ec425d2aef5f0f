"""bf16 against fp32 on the demo's own task (digits 5-9, 3 labels per class, the transfer arm and the scratch arm).

Each seed (another draw of labelled images, another initialisation) is prepared once and trained
twice, in fp32 and in bf16 autocast, from params.yaml's defaults; test accuracy is scored in fp32
by the evaluate stage's own code. Prints mean ± std per precision and the paired difference
(bf16 − fp32) with its 95 % t interval, per arm. Needs the demo's data and source weights
(`make demo` once). Usage: python bench/precision_demo.py [--seeds 5] [--arms transfer scratch]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--arms", nargs="+", default=["transfer", "scratch"])
    args = parser.parse_args()
    os.chdir(ROOT)
    from flows.core.evaluate import evaluate
    from flows.core.params import Params, load_params
    from flows.core.prepare import prepare
    from flows.core.train import train
    from flows.demo.run import ARMS
    from flows.demo.stats import paired_difference, summarise
    from flows.run.overrides import parse_overrides

    base = load_params(ROOT / "params.yaml").to_dict()
    for arm in args.arms:
        acc: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for seed in range(1, args.seeds + 1):
            with tempfile.TemporaryDirectory() as tmp:
                tmp = Path(tmp)
                for precision in ("fp32", "bf16"):
                    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
                    for key, value in parse_overrides([f"base.seed={seed}", f"train.precision={precision}",
                                                       *ARMS[arm]]).items():
                        group, name = key.split(".")
                        raw[group][name] = value
                    params = Params.model_validate(raw)
                    prepared = tmp / "prepared"
                    if not prepared.exists():
                        prepare(params, prepared)
                    models = tmp / precision / "models"
                    train(params, prepared, models, None, tmp / precision / "checkpoints")
                    metrics = evaluate(params, prepared, models, tmp / precision / "eval")
                    acc[precision].append(float(metrics["accuracy"]))
            print(f"{arm} seed {seed}: fp32 {acc['fp32'][-1]:.3f}  bf16 {acc['bf16'][-1]:.3f}", flush=True)
        f, b = summarise(acc["fp32"]), summarise(acc["bf16"])
        d = paired_difference(acc["bf16"], acc["fp32"])
        print(f"{arm}: fp32 {f.mean:.3f} ± {f.std:.3f}   bf16 {b.mean:.3f} ± {b.std:.3f}   "
              f"bf16 − fp32 {d.mean:+.3f} (95 % CI {d.low:+.3f} … {d.high:+.3f}), n={f.n}", flush=True)


if __name__ == "__main__":
    main()
