"""FedAvg against centralised training with the same total epochs, IID and non-IID (Dirichlet alpha).

    .venv/bin/python bench/fedavg_accuracy.py [--seeds 3] [--rounds 5] [--local-epochs 2] [--silos 3]

Data: the demo's digits 5-9 (`tunedeck demo` writes data/demo/digits-5-9), decoded at 32 px, a
stratified 30 % test split held by the "coordinator". Model: timm's tiny test_resnet from random
initialisation (pretrained=False: offline, and small enough for a CPU). Both arms run the same
local round (flows.core.fedavg_train.local_round, the Trainer: same optimizer, batch size and one cosine LR over the
run's epochs); centralised training sees the pooled silos' images for rounds x local epochs,
FedAvg sees each silo's share for local epochs per round. The averaging is the coordinator's
(flows.core.fedavg), called in-process: the Prefect flows around it are tested in
tests/integration/test_federated.py, this measures the algorithm. Prints a markdown report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flows.core.fedavg import dirichlet_split, iid_split, weighted_average
from flows.core.fedavg_train import Schedule, cpu_state, global_score, local_round
from flows.core.images import decode_folder
from flows.core.params import TrainParams
from flows.core.split import stratified_split

SOURCE = Path("data/demo/digits-5-9")
MODEL = "test_resnet"
CLASSES = [str(i) for i in range(100)]  # names only: the Trainer's manifest wants some
TRAIN = TrainParams(batch_size=16, lr=3e-3, weight_decay=0.05, optimizer="adamw", scheduler="cosine", hflip=0.0)


def new_model(classes: int, seed: int):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(MODEL, pretrained=False, num_classes=classes)


def centralised(x, y, tx, ty, classes: int, epochs: int, seed: int) -> float:
    model = new_model(classes, seed)
    local_round(model, MODEL, x, y, TRAIN, Schedule(0, epochs, epochs, seed), CLASSES[:classes])
    return global_score(model, tx, ty, 256)[1]


def fedavg(x, y, tx, ty, parts, classes: int, rounds: int, local: int, seed: int) -> list[float]:
    """Global test accuracy after each round."""
    model = new_model(classes, seed)
    state, curve = cpu_state(model), []
    for r in range(rounds):
        states = []
        for i, idx in enumerate(parts):
            model.load_state_dict(state)
            local_round(model, MODEL, x[idx], y[idx], TRAIN, Schedule(r * local, local, rounds * local, seed * 10 + i + 10_000 * r),
                        CLASSES[:classes])
            states.append(cpu_state(model))
        state = weighted_average(states, [len(p) for p in parts])
        model.load_state_dict(state)
        curve.append(global_score(model, tx, ty, 256)[1])
    return curve


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE} not found: run `tunedeck demo` once (it writes the demo's digits).")
    data = decode_folder(SOURCE, 32)
    split = stratified_split(data.labels, 0.0, 0.3, 0, None)
    x, y = data.images[split["train"]], data.labels[split["train"]]
    tx, ty = data.images[split["test"]], data.labels[split["test"]]
    classes, epochs = len(data.classes), args.rounds * args.local_epochs
    print(f"{len(y)} train / {len(ty)} test images, {classes} classes; {args.silos} silos, {args.rounds} rounds x "
          f"{args.local_epochs} local epochs = {epochs} epochs; {MODEL}; torch threads {torch.get_num_threads()}", flush=True)
    rows = {"central": [], "iid": [], "noniid": []}
    curves = {"iid": [], "noniid": []}
    started = time.perf_counter()
    for seed in range(args.seeds):
        rows["central"].append(centralised(x, y, tx, ty, classes, epochs, seed))
        curve = fedavg(x, y, tx, ty, iid_split(len(y), args.silos, seed), classes, args.rounds, args.local_epochs, seed)
        curves["iid"].append(curve)
        rows["iid"].append(curve[-1])
        parts = dirichlet_split(y, args.silos, args.alpha, seed, min_size=args.silos * TRAIN.batch_size // 2)
        curve = fedavg(x, y, tx, ty, parts, classes, args.rounds, args.local_epochs, seed)
        curves["noniid"].append(curve)
        rows["noniid"].append(curve[-1])
        print(f"seed {seed}: central {rows['central'][-1]:.4f}  fedavg IID {rows['iid'][-1]:.4f}  "
              f"fedavg Dir({args.alpha}) {rows['noniid'][-1]:.4f}  sizes {[len(p) for p in parts]}  "
              f"({time.perf_counter() - started:.0f} s)\n  per round: IID {[round(a, 4) for a in curves['iid'][-1]]}  "
              f"non-IID {[round(a, 4) for a in curves['noniid'][-1]]}", flush=True)
    gaps = [c - f for c, f in zip(rows["central"], rows["iid"], strict=True)]
    print("\n| arm | test accuracy % (mean ± std over seeds) |\n|---|---|")
    print(f"| centralised, {epochs} epochs | {mean_std(rows['central'])} |")
    print(f"| FedAvg IID, {args.silos} silos | {mean_std(rows['iid'])} |")
    print(f"| FedAvg Dirichlet α={args.alpha} | {mean_std(rows['noniid'])} |")
    print(f"\ncentralised − FedAvg IID: {mean_std(gaps)} points (paired by seed)")
    print(f"\n| round | FedAvg IID acc % | FedAvg Dir(α={args.alpha}) acc % |\n|---|---|---|")
    for r in range(args.rounds):
        print(f"| {r + 1} | {mean_std([c[r] for c in curves['iid']])} | {mean_std([c[r] for c in curves['noniid']])} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "curves": curves, "args": vars(args) | {"json": None}}, indent=2))


if __name__ == "__main__":
    main()
