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
