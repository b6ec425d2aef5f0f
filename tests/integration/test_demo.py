"""`tunedeck demo` end to end in a temporary copy: its table is made of real DVC experiments and flow runs."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time

import psutil
import pytest

from flows.demo.stats import paired_difference, summarise
from flows.gateways.prefect_api import local_url, server_record
from flows.host import server
from tests.conftest import ROOT
from tests.integration.project import api, free_port, make_project, run
from tests.integration.test_pipeline import flow_runs

pytestmark = pytest.mark.slow
ROW = re.compile(r"^\s+(\d+)\s+([\d.]+)%\s+([\d.]+)%\s+([+-][\d.]+)$", re.M)


def experiments(project) -> dict[str, dict]:
    """name -> {seed, accuracy} of every experiment, read from `dvc exp show --json` (not by the demo's code)."""
    found = {}
    for baseline in json.loads(run(project, "dvc", "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = {
                "seed": data["params"]["params.yaml"]["data"]["base"]["seed"],
                "accuracy": data["metrics"]["eval/metrics.json"]["data"]["accuracy"],
            }
    return found


def processes_in(folder, leave: int | None = None) -> list[str]:
    """Every live process on this machine whose working directory is in folder, but the process group `leave`
    (a scan now, not a snapshot taken earlier)."""
    found = []
    for process in psutil.process_iter(["pid", "cwd", "cmdline", "status"]):
        if not str(process.info["cwd"] or "").startswith(str(folder)) or process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if leave is not None and os.getpgid(process.info["pid"]) == leave:
                continue
        except ProcessLookupError:
            continue
        found.append(f"{process.info['pid']}: {' '.join(process.info['cmdline'] or [])[:200]}")
    return found


def left_behind(folder, leave: int) -> list[str]:
    """processes_in(folder), once what is still on its way out has gone: a process's own exit takes a moment after its
    parent waited for it to close (hang guard: 10 s, where they go within a second)."""
    deadline = time.monotonic() + 10
    while (found := processes_in(folder, leave)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_demo_table_comes_from_real_runs(tmp_path):
    project = make_project(tmp_path / "demo")
    shutil.copy2(ROOT / "params.yaml", project / "params.yaml")  # the real defaults
    run(project, "git", "commit", "-qam", "real params")
    try:  # as `make demo` runs it: no PREFECT_API_URL, the demo starts the project's server (and leaves it up)
        # 3 source epochs, not 8: a weaker backbone, but what this test checks is the demo's machinery (and that
        # the transfer arm learned); the suite's longest test took 120-220 s in CI with 8
        proc = run(project, "tunedeck", "demo", "--seeds", "2", "--source-epochs", "3", "--port", str(free_port()))
        runs = flow_runs(local_url(project))
        spans = sorted((r["start_time"], r["end_time"]) for r in api(local_url(project), "flow_runs/filter"))
        # before the server stops (the demo leaves it up, on purpose: its runs are there to look at)
        left = left_behind(project, leave=server_record(project)["pid"])
    finally:
        server.stop(root=project)
    assert not left, "the demo left its worker or a run behind"
    rows = ROW.findall(proc.stdout)
    assert [int(seed) for seed, *_ in rows] == [1, 2], proc.stdout[-3000:]
    shown = experiments(project)
    transfer, scratch = [], []
    for seed, a, b, diff in rows:
        for arm, printed, values in (("transfer", a, transfer), ("scratch", b, scratch)):
            exp = shown[f"demo-s{seed}-{arm}"]
            assert exp["seed"] == int(seed), exp
            assert float(printed) == pytest.approx(exp["accuracy"] * 100, abs=0.051), (arm, seed, exp)
            values.append(exp["accuracy"])
        assert float(diff) == pytest.approx((transfer[-1] - scratch[-1]) * 100, abs=0.051)
    t, s, d = summarise(transfer), summarise(scratch), paired_difference(transfer, scratch)
    assert f"{t.mean:.1%} ± {t.std * 100:.1f}" in proc.stdout and f"{s.mean:.1%} ± {s.std * 100:.1f}" in proc.stdout
    assert f"[{d.low * 100:+.1f}, {d.high * 100:+.1f}]" in proc.stdout
    # Two seeds keep the suite short, too few for the demo's claim (transfer above scratch: `make demo`
    # measures it over 5 seeds, +23 to +28 points). What two seeds do show on any machine: the
    # transfer arm learned (measured 50.7 % +- 5.8 over 5 seeds, so a 2-seed mean has a std near 4 points)
    # far above chance on 5 classes (20 %), 7 of those stds away.
    assert t.mean > 1 / 5, proc.stdout[-2000:]
    # every experiment is the run a deployment makes: a flow run of `experiment` on the demo's worker, with
    # its model's version as a tag, in a workspace of its own (gone after), never writing params.yaml
    assert runs and all(state == "COMPLETED" for _, state, _, _ in runs), runs
    assert {name for name, *_ in runs} == {"experiment"}, runs
    names = sorted(params["name"] for _, _, params, _ in runs)
    assert names == sorted(["demo-source", *(f"demo-s{s}-{arm}" for s in (1, 2) for arm in ("transfer", "scratch"))]), \
        "the source and every arm of every seed, once each"
    assert all(any(tag.startswith("model:") for tag in tags) for *_, tags in runs), runs
    assert not list((project / ".tunedeck" / "workspaces").iterdir())
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), \
        f"two runs at once on the worker's two CPU slots: {spans}"
    assert (project / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    assert (project / "weights" / "demo-source.safetensors").is_file()
    assert "demo-source" in shown
