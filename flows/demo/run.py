"""``tunedeck demo``: a real transfer-learning story that needs no internet, measured over seeds.

1. a local Prefect server, 2. real images from scikit-learn's bundled digits, versioned with
``dvc add``, 3. a source backbone trained on digits 0-4, 4. every seed's two arms: a linear
probe on that backbone (the params.yaml defaults) and a training from scratch with the same
epochs, batch and LR, 5. mean ± std per arm and the paired difference's 95 % interval, with
every seed's figures.

The target task is digits 5-9 with 3 labels per class. A seed draws other labelled images and
another initialisation, so the claim is about the method, not one lucky draw: on a few labels
one seed's margin moves by 15 points from one CPU to another. Every experiment is the run a
deployment makes (flows.demo.runs): a flow run of the `experiment` flow on a worker the demo
starts, in a workspace of its own, saved as a DVC experiment (`dvc exp show` lists them); the
clone's params.yaml is never written. The scratch arms need no backbone, so they start beside
the source's training; the transfer arms once its weights are in weights/.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.core.paths import MODEL_CONFIG, MODEL_WEIGHTS
from flows.demo.digits import write_digits
from flows.demo.runs import DemoRuns, Planned
from flows.demo.stats import paired_difference, summarise
from flows.gateways import prefect_api
from flows.gateways.dvc import experiments
from flows.gateways.dvc.cli import dvc
from flows.gateways.git import head
from flows.host import server
from flows.ship.gate import exp_commit

SOURCE_DATA = Path("data/demo/digits-0-4")
TARGET_DATA = Path("data/demo/digits-5-9")
SOURCE_WEIGHTS = Path("weights/demo-source.safetensors")
SOURCE_NAME = "demo-source"
SOURCE_EPOCHS = 8
"""The source's epochs: the demo's claim is measured with these (fewer, `--source-epochs`, for a quicker look)."""


def source_experiment(epochs: int = SOURCE_EPOCHS) -> Planned:
    """The source backbone's experiment: resnet18 from scratch on every labelled image of digits 0-4."""
    return Planned(SOURCE_NAME, [
        f"data.source={SOURCE_DATA}",
        "data.limit_per_class=null",
        "data.test_fraction=0.15",
        "model.pretrained=false",
        "train.batch_size=64",
        f"train.epochs={epochs}",
        "train.freeze_epochs=0",
        "train.head_lr_scale=1.0",
    ])
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


def trial(arm: str, seed: int) -> Planned:
    """The experiment of one arm and seed, e.g. demo-s3-transfer (base.seed=3)."""
    return Planned(f"demo-s{seed}-{arm}", [f"base.seed={seed}", *ARMS[arm]])


def export_source(root: Path) -> float:
    """The source experiment's model into weights/ (from the DVC cache its run filled); its test accuracy."""
    commit = exp_commit(root, SOURCE_NAME)
    for path, target in ((MODEL_WEIGHTS, SOURCE_WEIGHTS), (MODEL_CONFIG, SOURCE_WEIGHTS.with_suffix(".json"))):
        part = root / target.with_name(target.name + ".part")
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(experiments.read_output(root, str(path), commit))
        part.replace(root / target)  # a new file: workspaces that linked the old one keep it
    return metric(experiments.rows(root)[SOURCE_NAME], "accuracy")


def check_project() -> None:
    """The demo runs in a git clone of tunedeck (its runs work in git worktrees of a commit)."""

    if not Path("dvc.yaml").is_file() or not Path(".dvc").is_dir():
        raise TunedeckError("run `tunedeck demo` from the tunedeck project root (where dvc.yaml is).")
    if head(Path.cwd()) is None:
        raise TunedeckError("the project is not a git repository with a commit: clone tunedeck with git, then run the demo.")


def start_server_and_data(port: int) -> str:
    """The Prefect server (or PREFECT_API_URL's); while it starts, the digits folders, versioned with dvc add."""
    with ThreadPoolExecutor(1) as pool:
        counts = pool.submit(write_data)
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
    dvc("add", "-q", str(SOURCE_DATA), str(TARGET_DATA))
    return counts


def run_demo(settings: Settings, port: int = server.DEFAULT_PORT, seeds: tuple[int, ...] = SEEDS, jobs: int | None = None,
             source_epochs: int = SOURCE_EPOCHS) -> list[Trial]:
    """The whole demo; returns every seed's trials (transfer and scratch)."""
    check_project()
    tic = time.perf_counter()
    root = Path.cwd()
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    url = start_server_and_data(port)
    with DemoRuns(root, url, jobs, settings) as runs:
        print(f"[3/5] source backbone: resnet18 from scratch on digits 0-4 (all labels, {source_epochs} epochs); beside it, "
              "the scratch arms on")
        print(f"    digits 5-9. Deployment runs of experiment/demo on a worker of this clone, {jobs} at a time "
              "(`tunedeck dash` shows them)")
        source = runs.start(source_experiment(source_epochs))

        def transfer_arms(run_id: str) -> list[str]:
            if run_id != source:
                return []
            print(f"    exported to {SOURCE_WEIGHTS} (test accuracy on 0-4: {export_source(root):.1%})")
            print(f"[4/5] digits 5-9, 3 labels per class, seeds {', '.join(map(str, seeds))}: a linear probe on the "
                  "source backbone (params.yaml as committed), beside the scratch arms left")
            return [runs.start(trial("transfer", seed)) for seed in seeds]

        runs.wait([source, *(runs.start(trial("scratch", seed)) for seed in seeds)], transfer_arms)
    rows = results(root, [trial(arm, seed).name for arm in ARMS for seed in seeds])
    trials = [Trial(trial(arm, seed).name, arm, seed, metric(rows[trial(arm, seed).name], "accuracy"))
              for arm in ("transfer", "scratch") for seed in seeds]
    print("[5/5] results: test accuracy on digits 5-9, each figure one DVC experiment")
    print_table(trials, url, time.perf_counter() - tic)
    return trials


def results(root: Path, names: list[str]) -> dict[str, dict]:
    """name -> that experiment's row of `dvc exp show`; a missing or failed one is an error."""
    rows = experiments.rows(root)
    for name in names:
        state = rows[name].get("State") if name in rows else "missing"
        if state not in (None, "Success"):
            raise TunedeckError(f"the experiment {name} is {state} in `dvc exp show`: its flow run's log says why.")
    return {name: rows[name] for name in names}


def metric(row: dict, name: str, path: str = "eval/metrics.json") -> float:
    """One metric of an experiment's row (`dvc exp show` names a column by its file only when two files share it)."""
    for key in (name, f"{path}:{name}"):
        if isinstance(row.get(key), float):
            return row[key]
    raise TunedeckError(f"the experiment {row.get('Experiment')} has no '{name}' in {path}.")


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
    print(f"    prefect flow-run ls           every experiment as a flow run, its stages as tasks ({url.removesuffix('/api')})")
    print("    tunedeck dash                 the same runs, their hosts, params and versions; the experiments")
    print("    dvc exp show                  demo-source and every demo-s<seed>-<arm>, side by side")
    print("    dvc exp apply demo-s1-transfer   one seed's model and metrics into the workspace,")
    print("    dvc metrics show; dvc plots show   then its test metrics, training curves, confusion matrix")
    print("    tunedeck server stop          stop the local Prefect server")
