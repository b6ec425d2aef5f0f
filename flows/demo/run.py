"""``tunedeck demo``: a real transfer-learning story that needs no internet, measured over seeds.

1. a local Prefect server (so every stage is a flow run), 2. real images from scikit-learn's
bundled digits, versioned with ``dvc add``, 3. a source backbone trained on digits 0-4 through
the normal pipeline (a `dvc exp run`), 4. every seed's two arms, two at a time in DVC's queue:
a linear probe on that backbone (the params.yaml defaults) and a training from scratch with the
same epochs, batch and LR, 5. mean ± std per arm and the paired difference's 95 % interval,
with every seed's figures.

The target task is digits 5-9 with 3 labels per class. A seed draws other labelled images and
another initialisation, so the claim is about the method, not one lucky draw: on a few labels
one seed's margin moves by 15 points from one CPU to another. Every run is a DVC experiment
run by DVC's queue in a workspace of its own (`dvc exp show` lists them), and every stage of
it a Prefect flow run.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flows.core.errors import TunedeckError
from flows.core.paths import MODEL_CONFIG, MODEL_WEIGHTS
from flows.demo.digits import write_digits
from flows.demo.queue import Queued, child_env, dvc, metric, queue, results, run_queued
from flows.demo.stats import paired_difference, summarise
from flows.gateways import prefect_api
from flows.gateways.git import head
from flows.host import server

SOURCE_DATA = Path("data/demo/digits-0-4")
TARGET_DATA = Path("data/demo/digits-5-9")
SOURCE_WEIGHTS = Path("weights/demo-source.safetensors")
SOURCE = Queued("demo-source", [
    f"data.source={SOURCE_DATA}",
    "data.limit_per_class=null",
    "data.test_fraction=0.15",
    "model.pretrained=false",
    "train.batch_size=64",
    "train.epochs=8",
    "train.freeze_epochs=0",
    "train.head_lr_scale=1.0",
])  # run in the workspace (its weights must be on disk before any transfer arm starts)
ARMS = {  # the params.yaml defaults are the transfer arm; scratch changes only what makes it scratch
    "transfer": [],
    "scratch": ["model.pretrained=false", "train.freeze_epochs=0", "train.head_lr_scale=1.0"],
}
SEEDS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class Trial:
    """One DVC experiment of the demo: its name, arm, seed and test accuracy."""

    name: str
    arm: str
    seed: int
    accuracy: float


def trial(arm: str, seed: int) -> Queued:
    """The experiment of one arm and seed, e.g. demo-s3-transfer (base.seed=3)."""
    copy = [str(TARGET_DATA), f"{TARGET_DATA}.dvc"]  # the folder first: it makes data/demo/ for the .dvc file
    if arm == "transfer":
        copy += [str(SOURCE_WEIGHTS), str(SOURCE_WEIGHTS.with_suffix(".json"))]
    return Queued(f"demo-s{seed}-{arm}", [f"base.seed={seed}", *ARMS[arm]], copy)


def source_backbone() -> float:
    """Pretrain resnet18 on digits 0-4 (a `dvc exp run` in the workspace) and export it; its test accuracy.

    params.yaml is put back as it was (the experiment applied its overrides to the workspace).
    """
    import json

    params_text = Path("params.yaml").read_text()
    args = ["exp", "run", "-n", SOURCE.name, "evaluate"]  # up to evaluate: no export of the source model
    for item in SOURCE.overrides:
        args += ["-S", item]
    try:
        dvc("exp", "remove", SOURCE.name, quiet=True, check=False)
        dvc(*args, quiet=True)
    finally:
        Path("params.yaml").write_text(params_text)
    shutil.copy2(MODEL_WEIGHTS, SOURCE_WEIGHTS)
    shutil.copy2(MODEL_CONFIG, SOURCE_WEIGHTS.with_suffix(".json"))
    return json.loads(Path("eval/metrics.json").read_text())["accuracy"]


def check_project() -> None:
    """The demo runs in a git clone of tunedeck (dvc experiments need a git commit)."""

    if not Path("dvc.yaml").is_file() or not Path(".dvc").is_dir():
        raise TunedeckError("run `tunedeck demo` from the tunedeck project root (where dvc.yaml is).")
    if head(Path.cwd()) is None:
        raise TunedeckError("the project is not a git repository with a commit: clone tunedeck with git, then run the demo.")


def start_server_and_data(port: int, experiments: list[Queued]) -> str:
    """The Prefect server (or PREFECT_API_URL's); while it starts, the digits folders and the queued experiments.

    Queueing needs no server, and the transfer arms' source weights are copied into their
    workspaces when each one starts, not now.
    """
    with ThreadPoolExecutor(1) as pool:
        counts = pool.submit(lambda: (write_data(), queue(experiments))[0])
        print("[1/5] Prefect: ", end="", flush=True)
        url = os.environ.get("PREFECT_API_URL") or server.start(port)
        if not prefect_api.healthy(url, timeout=3.0):
            raise TunedeckError(f"PREFECT_API_URL is {url} but no Prefect server answers there: start it, or unset it.")
        print(f"server at {url.removesuffix('/api')}")
        source_count, target_count = counts.result()
    print("[2/5] data: scikit-learn's bundled digits as 32x32 PNG folders, versioned with dvc add")
    print(f"    {source_count} images of 0-4 in {SOURCE_DATA}")
    print(f"    {target_count} images of 5-9 in {TARGET_DATA}")
    return url


def write_data() -> tuple[int, int]:
    """The two digits folders, versioned with `dvc add`; their image counts."""
    counts = write_digits(SOURCE_DATA, range(0, 5)), write_digits(TARGET_DATA, range(5, 10))
    dvc("add", "-q", str(SOURCE_DATA), str(TARGET_DATA), quiet=True)
    return counts


def run_demo(port: int = server.DEFAULT_PORT, seeds: tuple[int, ...] = SEEDS, jobs: int | None = None) -> list[Trial]:
    """The whole demo; returns every seed's trials (transfer and scratch)."""
    check_project()
    tic = time.perf_counter()
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    transfer, scratch = ([trial(arm, seed) for seed in seeds] for arm in ("transfer", "scratch"))
    url = start_server_and_data(port, [q for pair in zip(transfer, scratch, strict=True) for q in pair])
    env = child_env(PREFECT_API_URL=url)  # the queued workspaces have no server record of their own
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # a core each: runs side by side, not threads that fight
    print("[3/5] source backbone: resnet18 from scratch on digits 0-4 (all labels)")
    print(f"    exported to {SOURCE_WEIGHTS} (test accuracy on 0-4: {source_backbone():.1%})")
    print(f"[4/5] digits 5-9, 3 labels per class, seeds {', '.join(map(str, seeds))}: a linear probe on the source "
          f"backbone (params.yaml as committed) and from scratch; DVC's queue, {jobs} at a time")
    run_queued(jobs, env)
    rows = results([t.name for t in transfer + scratch])
    trials = [Trial(q.name, arm, seed, metric(rows[q.name], "accuracy"))
              for arm, runs in (("transfer", transfer), ("scratch", scratch)) for seed, q in zip(seeds, runs, strict=True)]
    print("[5/5] results: test accuracy on digits 5-9, each figure one DVC experiment")
    print_table(trials, url, time.perf_counter() - tic)
    return trials


def print_table(trials: list[Trial], url: str, total: float) -> None:
    """Every seed's pair, mean ± std per arm, the paired difference's 95 % interval; where to look next."""
    by_arm = {arm: [t for t in trials if t.arm == arm] for arm in ARMS}
    transfer, scratch = ([t.accuracy for t in by_arm[arm]] for arm in ("transfer", "scratch"))
    print()
    print("  seed   transfer   scratch   difference")
    for a, b in zip(by_arm["transfer"], by_arm["scratch"], strict=True):
        print(f"  {a.seed:>4}   {a.accuracy:>8.1%}   {b.accuracy:>7.1%}   {(a.accuracy - b.accuracy) * 100:>+8.1f}")
    t, s, d = summarise(transfer), summarise(scratch), paired_difference(transfer, scratch)
    print()
    print(f"  digits 5-9, 3 labels/class, {d.n} seeds            test accuracy, mean ± std")
    print(f"  transfer: linear probe on the 0-4 backbone   {t.mean:>7.1%} ± {t.std * 100:.1f}")
    print(f"  from scratch, same epochs, batch and LR      {s.mean:>7.1%} ± {s.std * 100:.1f}")
    print(f"  transfer gains {d.mean * 100:+.1f} points, 95 % interval [{d.low * 100:+.1f}, {d.high * 100:+.1f}] "
          f"(paired t over seeds); the whole demo took {total:.0f} s")
    print()
    print("  where to look:")
    print(f"    prefect flow-run ls           every stage as a flow run ({url.removesuffix('/api')})")
    print("    dvc exp show                  demo-source and every demo-s<seed>-<arm>, side by side")
    print("    dvc exp apply demo-s1-transfer   one seed's model and metrics into the workspace,")
    print("    dvc metrics show; dvc plots show   then its test metrics, training curves, confusion matrix")
    print("    tunedeck server stop          stop the local Prefect server")
