"""``tunedeck demo``: a real transfer-learning story that needs no internet.

1. a local Prefect server (so every stage is a flow run), 2. real images from scikit-learn's
bundled digits, versioned with ``dvc add``, 3. a source backbone trained on digits 0-4 through
the normal pipeline and exported, 4. the normal pipeline on digits 5-9 with 5 labels per class,
from scratch and then as a linear probe on the source backbone (the params.yaml defaults),
each a ``dvc exp run`` with the same epochs, batch and LR, 5. a table comparing the two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flows import server
from flows.core.errors import TunedeckError
from flows.core.paths import MODEL_CONFIG, MODEL_WEIGHTS
from flows.demo.digits import write_digits

SOURCE_DATA = Path("data/demo/digits-0-4")
TARGET_DATA = Path("data/demo/digits-5-9")
SOURCE_WEIGHTS = Path("weights/demo-source.safetensors")
SOURCE_OVERRIDES = [
    f"data.source={SOURCE_DATA}",
    "data.limit_per_class=null",
    "data.test_fraction=0.15",
    "model.pretrained=false",
    "train.batch_size=64",
    "train.epochs=8",
    "train.freeze_epochs=0",
    "train.head_lr_scale=1.0",
]
SCRATCH_OVERRIDES = ["model.pretrained=false", "train.freeze_epochs=0", "train.head_lr_scale=1.0"]


@dataclass(frozen=True)
class Outcome:
    """One experiment of the demo: its name, test accuracy and wall time."""

    name: str
    accuracy: float
    seconds: float


def tool(name: str) -> str:
    """A command from this interpreter's environment (the project's .venv), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def child_env() -> dict[str, str]:
    """Environment for dvc and the stages: this venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc(*args: str, quiet: bool = False) -> None:
    """Run one dvc command with list arguments; its output is shown indented, failure is an error."""
    proc = subprocess.Popen([tool("dvc"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not quiet and "No file hash info found" not in line:
            print(f"    {line}", end="", flush=True)
    if proc.wait() != 0:
        tail = "".join(lines[-5:]).strip()
        raise TunedeckError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}): {tail[-400:]}")


def experiment(name: str, overrides: list[str], params_text: str) -> Outcome:
    """params.yaml reset to its defaults, then one ``dvc exp run`` with overrides; its test accuracy."""
    Path("params.yaml").write_text(params_text)
    subprocess.run([tool("dvc"), "exp", "remove", name], capture_output=True, env=child_env())
    args = ["exp", "run", "-n", name]
    for item in overrides:
        args += ["-S", item]
    dvc(*args)
    accuracy = json.loads(Path("eval/metrics.json").read_text())["accuracy"]
    seconds = json.loads(Path("models/model.json").read_text())["train_seconds"]
    return Outcome(name, accuracy, seconds)


def check_project() -> None:
    """The demo runs in a git clone of tunedeck (dvc experiments need a git commit)."""
    if not Path("dvc.yaml").is_file() or not Path(".dvc").is_dir():
        raise TunedeckError("run `tunedeck demo` from the tunedeck project root (where dvc.yaml is).")
    head = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], capture_output=True)
    if head.returncode != 0:
        raise TunedeckError("the project is not a git repository with a commit: clone tunedeck with git, then run the demo.")


def run_demo(port: int = server.DEFAULT_PORT) -> list[Outcome]:
    """The whole demo; returns the scratch and transfer outcomes (after the source one)."""
    check_project()
    tic = time.perf_counter()
    print("[1/5] Prefect: ", end="", flush=True)
    url = os.environ.get("PREFECT_API_URL") or server.start(port)
    if not server.healthy(url, timeout=3.0):
        raise TunedeckError(f"PREFECT_API_URL is {url} but no Prefect server answers there: start it, or unset it.")
    print(f"server at {url.removesuffix('/api')}")
    print("[2/5] data: scikit-learn's bundled digits as 32x32 PNG folders, versioned with dvc add")
    print(f"    {write_digits(SOURCE_DATA, range(0, 5))} images of 0-4 in {SOURCE_DATA}")
    print(f"    {write_digits(TARGET_DATA, range(5, 10))} images of 5-9 in {TARGET_DATA}")
    dvc("add", "-q", str(SOURCE_DATA), str(TARGET_DATA), quiet=True)
    params_text = Path("params.yaml").read_text()
    try:
        print("[3/5] source backbone: resnet18 from scratch on digits 0-4 (all labels)")
        source = experiment("demo-source", SOURCE_OVERRIDES, params_text)
        shutil.copy2(MODEL_WEIGHTS, SOURCE_WEIGHTS)
        shutil.copy2(MODEL_CONFIG, SOURCE_WEIGHTS.with_suffix(".json"))
        print(f"    exported to {SOURCE_WEIGHTS} (test accuracy on 0-4: {source.accuracy:.1%})")
        print("[4/5] digits 5-9, 5 labels per class, from scratch")
        scratch = experiment("demo-scratch", SCRATCH_OVERRIDES, params_text)
        print("[5/5] digits 5-9, 5 labels per class, a linear probe on the source backbone (params.yaml as committed)")
        transfer = experiment("demo-transfer", [], params_text)
    finally:
        Path("params.yaml").write_text(params_text)
    print_table(scratch, transfer, url, time.perf_counter() - tic)
    return [source, scratch, transfer]


def print_table(scratch: Outcome, transfer: Outcome, url: str, total: float) -> None:
    """The comparison, and where to look next."""
    gain = (transfer.accuracy - scratch.accuracy) * 100
    print()
    print("  digits 5-9, 5 labels/class    test accuracy   train time")
    print(f"  transfer from 0-4 backbone     {transfer.accuracy:>12.1%}   {transfer.seconds:>7.0f} s")
    print(f"  from scratch, same budget      {scratch.accuracy:>12.1%}   {scratch.seconds:>7.0f} s")
    print(f"  transfer gains {gain:+.1f} points; the whole demo took {total:.0f} s")
    print()
    print("  where to look:")
    print(f"    prefect flow-run ls           every stage as a flow run ({url.removesuffix('/api')})")
    print("    dvc exp show                  demo-source, demo-scratch, demo-transfer side by side")
    print("    dvc metrics show; dvc plots show   test metrics, training curves, confusion matrix")
    print("    models/model.safetensors      the fine-tuned model (+ model.json, params.yaml)")
    print("    tunedeck server stop          stop the local Prefect server")
