"""`kill -TERM` of `tunedeck worker` (what a supervisor sends) stops its Prefect worker and its runs, all of them."""

from __future__ import annotations

import subprocess
import time

import psutil
import pytest

from flows import server
from tests.integration.project import checkpoint_written, env, free_port, make_project, run
from tests.integration.test_deployments import start, wait

pytestmark = pytest.mark.slow


def test_sigterm_to_the_worker_leaves_no_process_and_no_running_run(tmp_path):
    project = make_project(tmp_path / "clone")
    url = server.start(free_port(), root=project)
    worker = None
    try:
        run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
        worker = subprocess.Popen(["tunedeck", "worker", "--pool", "local"], cwd=project, env=env(PREFECT_API_URL=url),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        run_id = start(url, "pipeline", overrides=["train.epochs=5000"], pull=False, push=False)
        deadline = time.monotonic() + 300  # a hang guard: the event is the run's first checkpoint
        while not checkpoint_written(project / "checkpoints"):
            assert time.monotonic() < deadline and worker.poll() is None, "the run never started training"
            time.sleep(0.1)
        family = psutil.Process(worker.pid).children(recursive=True)
        assert any("flows.stages.train" in " ".join(p.cmdline()) for p in family), "the train stage is not in the family"
        worker.terminate()  # SIGTERM to `tunedeck worker` alone, not to its process group
        # tunedeck worker kills what outlives its 8 s grace, so 10 s holds on any machine
        _, alive = psutil.wait_procs([psutil.Process(worker.pid), *family], timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        assert "stopped by SIGTERM" in worker.stderr.read()
        assert wait(url, run_id, timeout=60)["state_type"] in ("CRASHED", "CANCELLED")
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        server.stop(root=project)


def test_a_run_whose_process_dies_during_a_server_outage_is_crashed_soon_after_the_server_returns(tmp_path):
    """kill -9 of the server while a deployment run trains, then kill -9 of the run's processes; the server
    restarts: within 30 s the run reads CRASHED (the worker's reconciliation), never RUNNING."""
    import json
    import os
    import signal

    from tests.integration.project import api
    from tests.integration.test_deployments import _process_tree, deployment_id

    project = make_project(tmp_path / "clone")
    port = free_port()
    url = server.start(port, root=project)
    worker = None
    try:
        run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
        # no client retries: the Prefect worker's own report of the dead run fails at once, as it does once its
        # retries run out in a longer outage, so only the reconciliation can set the run's end
        worker = subprocess.Popen(["tunedeck", "worker", "--pool", "local"], cwd=project,
                                  env=env(PREFECT_API_URL=url, PREFECT_CLIENT_MAX_RETRIES="0"),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deployment = deployment_id(url, "pipeline")  # the run itself keeps Prefect's retries (busy SQLite answers 503)
        run_id = api(url, f"deployments/{deployment}/create_flow_run", {
            "parameters": {"overrides": ["train.epochs=5000"], "pull": False, "push": False},
            "job_variables": {"env": {"PREFECT_CLIENT_MAX_RETRIES": "5"}}})["id"]
        deadline = time.monotonic() + 300  # a hang guard: the event is the run's first checkpoint
        while not checkpoint_written(project / "checkpoints"):
            assert time.monotonic() < deadline and worker.poll() is None, "the run never started training"
            time.sleep(0.1)
        family = _process_tree(run_id)
        assert family, "the run's processes were not found"
        os.kill(json.loads((project / ".tunedeck" / "server.json").read_text())["pid"], signal.SIGKILL)
        for proc in family:
            proc.kill()
        psutil.wait_procs(family, timeout=10)
        time.sleep(8)  # the outage goes on after the run died: nobody could record its end
        assert server.start(port, root=project) == url
        restarted = time.monotonic()
        while (state := api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]["state_type"]) != "CRASHED":
            assert time.monotonic() - restarted < 30, f"still {state} 30 s after the server came back"
            time.sleep(0.5)
        crashed = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]["state"]["message"]
        print(f"CRASHED {time.monotonic() - restarted:.1f} s after the restart: {crashed}")
        assert "while its end could not be recorded" in crashed, crashed
        assert worker.poll() is None, "the worker outlived the outage"
    finally:
        if worker is not None and worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=30)
        server.stop(root=project)
