"""`kill -TERM` of `tunedeck worker` (what a supervisor sends) stops its Prefect worker and its runs, all of them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from flows.host import server
from tests.integration.cluster import cluster
from tests.integration.project import FINAL, api, checkpoint_written, free_port, wait
from tests.integration.test_deployments import _process_tree, deployment_id, start

pytestmark = pytest.mark.slow
STOP_GUARD_S = 60  # a hang guard, >= 5x the measured median (9.3 s; the worker grace is 8 s): SIGTERM to runs final
CRASH_GUARD_S = 60  # a hang guard, >= 5x the measured median (1.2 s): server back to the dead run read CRASHED


def test_sigterm_to_the_worker_leaves_no_process_and_both_its_runs_final(tmp_path):
    """Two runs train on the worker's two stand-in GPUs; SIGTERM to `tunedeck worker` alone. Once it has exited,
    no process of the clone is left on the machine (every process scanned, not a list of children taken before:
    one that slipped out of the family would be missed) and both runs read a final state on the server."""
    with cluster(tmp_path, gpus=2) as c:
        project, url, worker = c.project, c.url, c.worker
        # two run keys (epochs differ), so each run's first checkpoint is a file of its own: the event waited on
        runs = [start(url, "pipeline", overrides=[f"train.epochs={n}"], pull=False, push=False) for n in (5000, 5001)]
        deadline = time.monotonic() + 600  # a hang guard: the event is both runs' first checkpoint
        while len(list((project / "checkpoints").glob("*/last.pt"))) < 2:
            assert time.monotonic() < deadline and worker.poll() is None, "the two runs never both trained"
            time.sleep(0.1)
        assert all(_process_tree(r) for r in runs), "a run's processes were not found"
        signalled = time.monotonic()
        worker.terminate()  # SIGTERM to `tunedeck worker` alone, not to its process group
        worker.wait(timeout=STOP_GUARD_S)
        print(f"the worker exited {time.monotonic() - signalled:.1f} s after SIGTERM")
        assert clone_processes(project) == [], "left running after the worker exited"
        log = c.log.read_text()
        assert "stopped by SIGTERM" in log
        # where each run was as it was stopped, written by the run's own process (a hung run says where it hangs)
        assert all(f"the threads of flow run {r}" in log for r in runs), log[-3000:]
        assert log.count("(most recent call first)") >= 2, log[-3000:]
        states = [wait(url, r, timeout=STOP_GUARD_S)["state_type"] for r in runs]
        print(f"both runs final {time.monotonic() - signalled:.1f} s after SIGTERM: {states}")
        assert set(states) <= {"CRASHED", "CANCELLED"}, states


def clone_processes(project: Path) -> list[str]:
    """Every live process on this machine that works in the clone or names it (its workspaces are inside it),
    the clone's own Prefect server (started by the test, still needed) and its children aside."""
    server_pid = json.loads((project / ".tunedeck" / "server.json").read_text())["pid"]
    spared = {server_pid, *(p.pid for p in _children(server_pid))}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        info = proc.info
        if info["pid"] in spared or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if (info["cwd"] or "").startswith(str(project)) or str(project) in " ".join(info["cmdline"] or []):
            found.append(f"{info['pid']}: {' '.join(info['cmdline'] or [])[:200]}")
    return found


def _children(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def test_a_run_whose_process_dies_during_a_server_outage_is_crashed_soon_after_the_server_returns(tmp_path):
    """kill -9 of the server while a deployment run trains, then kill -9 of the run's processes; the server
    restarts: the run reads CRASHED (the worker's reconciliation), never RUNNING."""
    # few client retries (a busy SQLite answers 503 now and then, and the worker must still submit the run):
    # its own report of the dead run gives up within seconds, as it does in a longer outage with the
    # default retries, and the server stays down until it has (the event below), so only the reconciliation
    # can set the run's end. With none at all, one 503 at submission crashed the run (CI on 5c77344, 2 workers).
    with cluster(tmp_path, PREFECT_CLIENT_MAX_RETRIES="3") as c:
        project, port, url, worker, log = c.project, c.port, c.url, c.worker, c.log
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
        _, alive = psutil.wait_procs(family, timeout=STOP_GUARD_S)  # a hang guard: SIGKILL ends them at once
        assert not alive, f"SIGKILL left {[p.pid for p in alive]}"
        # the event: the worker saw the run's process end and failed to report it (the server is down), so nobody
        # could record its end; the outage goes on until then
        deadline = time.monotonic() + STOP_GUARD_S  # a hang guard
        while f"Failed to update state of flow run '{run_id}'" not in log.read_text():
            assert time.monotonic() < deadline, "the worker never tried to report the dead run:\n" + "\n".join(
                line[:200] for line in log.read_text().splitlines()[-40:])
            time.sleep(0.2)
        assert server.start(port, root=project) == url
        restarted = time.monotonic()
        while (state := api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]["state_type"]) != "CRASHED":
            assert state not in FINAL, f"the run read {state}, not CRASHED"
            assert time.monotonic() - restarted < CRASH_GUARD_S, f"still {state} {CRASH_GUARD_S} s after the server came back"
            time.sleep(0.5)
        crashed = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]["state"]["message"]
        print(f"CRASHED {time.monotonic() - restarted:.1f} s after the restart: {crashed}")
        # whoever got there first: the reconciliation (its own sentence) or, where one of the worker's client
        # retries outlived the outage (CI on 7cf2f30), the worker's own report of the killed process; the test
        # below pins the reconciliation alone
        assert "while its end could not be recorded" in crashed or "status code -9" in crashed, crashed
        assert worker.poll() is None, "the worker outlived the outage"


def test_the_reconciliation_marks_a_run_whose_process_went_during_an_outage_crashed_once_the_server_is_back(
        tmp_path, monkeypatch):
    """The worker's reconciliation alone, pinned (in the test above either it or the worker's own report, when one
    of its retries outlives the outage, may end the run): a Running run's process dies while the server is down;
    the looks during the outage settle nothing, the first after its return marks the run Crashed with its sentence.
    A run whose process lives is never touched."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.host.worker import GONE, Reconciler

    port = free_port()
    url = server.start(port, root=tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", url)
    procs = []
    try:
        flow = api(url, "flows/", {"name": "reconciled"})["id"]
        dies, lives = (api(url, "flow_runs/", {"flow_id": flow, "state": {"type": "RUNNING"}})["id"] for _ in range(2))
        procs = [subprocess.Popen(["sleep", "600"], env={**os.environ, "PREFECT__FLOW_RUN_ID": run_id})
                 for run_id in (dies, lives)]
        reconciler = Reconciler(os.getpid())  # this test stands for the worker: the runs' processes are its children
        with temporary_settings({PREFECT_API_URL: url}):
            reconciler.tick(0.0)
            assert reconciler.alive == {dies, lives}
            server.stop(root=tmp_path)  # the outage
            procs[0].kill()
            procs[0].wait()
            for now in (1.0, 1.0 + Reconciler.GRACE_S, 30.0):
                reconciler.tick(now)
            assert set(reconciler.gone) == {dies}, "the run was settled while the server was down"
            assert server.start(port, root=tmp_path) == url
            reconciler.tick(31.0)
        assert reconciler.gone == {}
        runs = {r["id"]: r for r in api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [dies, lives]}}})}
        assert (runs[dies]["state_type"], runs[dies]["state"]["message"]) == ("CRASHED", GONE)
        assert runs[lives]["state_type"] == "RUNNING"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        server.stop(root=tmp_path)
