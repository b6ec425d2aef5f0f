"""Shared fixtures: tiny real image folders and params, deterministic and offline."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from flows.core.params import Params, parse_params

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["pytester", "tests.ci_guard"]


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, each worker (and every process its tests start) gets its share of the cores as torch's
    threads, unless OMP_NUM_THREADS says otherwise. Left alone, each takes them all and their OpenMP pools fight:
    measured on 2 cores, `tests/unit -n 2` took 103 s with every process on 2 threads, 31 s on 1 (46 s with one
    worker), and one module's 2 s fixture took 92 s in CI."""
    workers = getattr(config.option, "numprocesses", None)
    if getattr(config, "workerinput", None) is None and isinstance(workers, int) and workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test first has every flow run process it left alive write its threads' stacks (SIGUSR1, armed by
    flows.host.steps.checkout) to its worker's log under the test's tmp folder: a run that hung says where."""
    report = yield
    if report.when == "call" and report.failed:
        import signal
        import time

        import psutil

        base = str(item.config._tmp_path_factory.getbasetemp())  # this xdist worker's tmp folders only
        signalled = []
        for proc in psutil.process_iter(["pid"]):
            try:  # a run's own process: its parent (the worker) is no run, unlike its stages'
                parent = proc.parent()
                if ("PREFECT__FLOW_RUN_ID" in proc.environ() and proc.cwd().startswith(base) and parent is not None
                        and "PREFECT__FLOW_RUN_ID" not in parent.environ()):
                    proc.send_signal(signal.SIGUSR1)
                    signalled.append(proc.pid)
            except (psutil.Error, OSError):
                continue
        if signalled:
            time.sleep(1)
            report.sections.append(("flow run stacks", f"SIGUSR1 to {signalled}: their stacks are in the worker logs under {base}"))
    return report


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test reaches the Hugging Face Hub, and none reports to a Prefect server by accident."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


def write_images(folder: Path, classes: dict[str, int], size: int = 20, seed: int = 0) -> Path:
    """A folder with one sub-folder per class of small PNGs whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    for c, (name, count) in enumerate(classes.items()):
        sub = folder / name
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = np.zeros((size, size, 3), dtype=np.uint8)
            base[..., c % 3] = 200
            noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(sub / f"{i:03d}.png")
    return folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three classes of 12 images each."""
    return write_images(tmp_path / "images", {"cat": 12, "dog": 12, "fox": 12})


def tiny_params_dict(source: str) -> dict:
    """The project's params.yaml, shrunk to a tiny timm test model on CPU."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["base"]["device"] = "cpu"
    raw["data"].update(source=source, image_size=16, val_fraction=0.2, test_fraction=0.2, limit_per_class=None)
    raw["model"].update(name="test_resnet", pretrained=False)
    raw["train"].update(epochs=2, batch_size=8, freeze_epochs=0, head_lr_scale=1.0)
    # fp32: bf16 autocast on a CPU gives this 16 px model's 1x1 layer4 non-finite gradients now and then
    # (a torch CPU kernel's edge case); tests/unit/test_speed.py covers bf16 and what auto picks
    raw["train"]["precision"] = "fp32"
    return raw


@pytest.fixture
def tiny_params(image_folder: Path) -> Params:
    """Params for the tiny image folder and model."""
    return parse_params(tiny_params_dict(str(image_folder)))
