"""Runs on one host are isolated: two overlapping pipeline runs on two GPU slots, each in its own workspace.

The worker's clone is never written; each run trains with exactly its own params and comes back
as a DVC experiment of its own; a third run waits for a free slot, then runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from flows.gateways.gpus import stand_in_env
from flows.host import server
from tests.integration.project import env, free_port, make_project, run, wait
from tests.integration.test_deployments import logs, start, task_intervals

pytestmark = pytest.mark.slow
RUNS = {"first": ["train.epochs=2", "train.lr=0.003"], "second": ["train.epochs=3", "train.lr=0.0001"],
        "third": ["train.epochs=2", "train.lr=0.002"]}


def experiments(project) -> dict[str, dict]:
    """name -> (params.yaml, dvclive metrics) of every DVC experiment, from `dvc exp show --json` in the clone."""
    found = {}
    for baseline in json.loads(run(project, "dvc", "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = {"params": data["params"]["params.yaml"]["data"],
                                  "live": data["metrics"]["dvclive/metrics.json"]["data"],
                                  "eval": data["metrics"]["eval/metrics.json"]["data"], "rev": data["rev"]}
    return found


def test_two_overlapping_runs_on_two_slots_each_train_with_their_own_params(tmp_path):
    project = make_project(tmp_path / "clone")
    url = server.start(free_port(), root=project)
    worker = None
    try:
        run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
        worker = subprocess.Popen(["tunedeck", "worker", "--pool", "local", "--gpus", "0,1"], cwd=project,
                                  env=env(PREFECT_API_URL=url, **stand_in_env(2, tmp_path / "stand-in-gpus")), stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / "worker.log", "w"), start_new_session=True)
        status = run(project, "git", "status", "--porcelain", "--untracked-files=all").stdout
        ids = {name: start(url, "pipeline", overrides=overrides, pull=False, push=False) for name, overrides in RUNS.items()}
        done = {name: wait(url, run_id, timeout=600) for name, run_id in ids.items()}
        for name, flow_run in done.items():
            assert flow_run["state_type"] == "COMPLETED", (name, logs(url, flow_run["id"])[-2000:])
            text = logs(url, flow_run["id"])
            assert "is busy" not in text and "Unable to acquire lock" not in text, text[-2000:]
        spans = {name: task_intervals(url, run_id) for name, run_id in ids.items()}
        first_end = min(max(e for _, e in spans[name]) for name in ("first", "second"))
        assert max(min(s for s, _ in spans[n]) for n in ("first", "second")) < first_end, "the two runs did not overlap"
        assert min(s for s, _ in spans["third"]) >= first_end, "the third run must wait for a free slot"
        assert run(project, "git", "status", "--porcelain", "--untracked-files=all").stdout == status, "the clone changed"
        shown = experiments(project)
        for name, overrides in RUNS.items():
            exp = shown[done[name]["name"]]
            epochs, lr = (float(o.split("=")[1]) for o in overrides)
            assert exp["params"]["train"]["epochs"] == epochs and exp["params"]["train"]["lr"] == lr, (name, exp["params"])
            assert exp["live"]["step"] == epochs - 1, (name, exp["live"])  # dvclive's last epoch: it trained that many
            assert 0.0 <= exp["eval"]["accuracy"] <= 1.0
            trained = run(project, "python", "-c", "import dvc.api, sys; sys.stdout.write(dvc.api.read("
                          f"'models/params.yaml', rev='{exp['rev']}'))").stdout
            assert f"epochs: {int(epochs)}" in trained and f"lr: {lr}" in trained, (name, trained)
        assert not list((project / ".tunedeck" / "workspaces").iterdir()), "workspaces are removed when runs end"
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=30)
        server.stop(root=project)
