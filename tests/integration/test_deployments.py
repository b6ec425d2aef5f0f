"""Deployments through real Prefect workers on 127.0.0.1: deploy, run, one GPU slot, crash and resume."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from flows import server
from tests.integration.project import api, checkpoint_written, env, free_port, make_project, run

pytestmark = pytest.mark.slow
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A tiny project, its Prefect server, the deployments, and two workers sharing one fake GPU."""
    project = make_project(tmp_path_factory.mktemp("deploy"))
    url = server.start(free_port(), root=project)
    workers = []
    try:
        run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
        for _ in range(2):
            workers.append(subprocess.Popen(
                ["tunedeck", "worker", "--pool", "local", "--gpus", "0"], cwd=project,
                env=env(PREFECT_API_URL=url, TUNEDECK_FAKE_GPUS="1", PREFECT_LOGGING_LEVEL="INFO"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ))
        yield project, url
    finally:
        for proc in workers:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        server.stop(root=project)


def deployment_id(url: str, name: str) -> str:
    return next(d["id"] for d in api(url, "deployments/filter") if d["name"] == name)


def start(url: str, deployment: str, **parameters) -> str:
    return api(url, f"deployments/{deployment_id(url, deployment)}/create_flow_run", {"parameters": parameters})["id"]


def wait(url: str, run_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]
        if flow_run["state_type"] in FINAL:
            return flow_run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s")


def logs(url: str, run_id: str) -> str:
    """Every log line of a flow run (paged: the API returns at most 200 at a time)."""
    lines: list[str] = []
    while True:
        page = api(url, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "offset": len(lines),
                                        "sort": "TIMESTAMP_ASC"})
        lines += [entry["message"] for entry in page]
        if len(page) < 200:
            return "\n".join(lines)


def task_intervals(url: str, run_id: str) -> list[tuple[str, str]]:
    tasks = api(url, "task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return [(t["start_time"], t["end_time"]) for t in tasks if t["start_time"]]


def test_deploy_lists_deployments_and_a_paused_schedule(cluster):
    project, url = cluster
    listed = run(project, "prefect", "deployment", "ls", PREFECT_API_URL=url).stdout
    assert "pipeline/pipeline" in listed and "experiment/train" in listed
    deployment = next(d for d in api(url, "deployments/filter") if d["name"] == "pipeline")
    assert deployment["schedules"] and deployment["schedules"][0]["active"] is False
    again = run(project, "tunedeck", "deploy", PREFECT_API_URL=url)  # idempotent
    assert again.returncode == 0 and len(api(url, "deployments/filter")) == 3


def test_pipeline_runs_through_a_worker_and_pushes_to_the_dvc_remote(cluster):
    project, url = cluster
    flow_run = wait(url, start(url, "pipeline"))
    assert flow_run["state_type"] == "COMPLETED", logs(url, flow_run["id"])[-2000:]
    assert flow_run["name"] in run(project, "dvc", "exp", "show", "--csv").stdout, "the run is a DVC experiment"
    assert {t.split(":")[0] for t in flow_run["tags"]} >= {"data", "model"}, flow_run["tags"]
    pushed = list((project / "dvc-remote").rglob("*"))
    assert any(p.is_file() for p in pushed), "dvc push put nothing on the remote"
    assert "holding GPU 0" in logs(url, flow_run["id"])
    artifacts = api(url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    versions = next(a["data"] for a in artifacts if a["key"] == "versions")
    for field in ("code", "data_version", "model_sha256", "accuracy"):
        assert f"| {field} |" in versions, versions


def test_two_runs_on_one_gpu_slot_never_overlap(cluster):
    project, url = cluster
    params_before = (project / "params.yaml").read_text()
    first = start(url, "pipeline", overrides=["train.epochs=3"], pull=False, push=False)
    second = start(url, "pipeline", overrides=["train.epochs=4"], pull=False, push=False)
    a, b = wait(url, first), wait(url, second)
    assert a["state_type"] == b["state_type"] == "COMPLETED"
    ia, ib = task_intervals(url, first), task_intervals(url, second)
    assert ia and ib
    assert max(e for _, e in ia) <= min(s for s, _ in ib) or max(e for _, e in ib) <= min(s for s, _ in ia)
    assert (project / "params.yaml").read_text() == params_before, "overrides must not outlive the run"


def test_a_killed_run_is_crashed_and_the_rerun_resumes(cluster):
    """kill -9 of a run's process tree while it trains: Crashed; the same run again resumes from its checkpoint.

    The kill waits on the event (this run's first checkpoint on disk), never on time: 100 epochs
    are left to go then, so it always lands mid-training, however fast the machine.
    """
    project, url = cluster
    params_before = (project / "params.yaml").read_text()
    overrides = ["train.epochs=100", "train.checkpoint_every=3"]
    shutil.rmtree(project / "checkpoints", ignore_errors=True)  # so the checkpoint waited for is this run's
    run_id = start(url, "pipeline", overrides=overrides, pull=False, push=False)
    deadline = time.monotonic() + 300  # a hang guard
    while not checkpoint_written(project / "checkpoints"):
        assert time.monotonic() < deadline, ("no checkpoint was written", wait(url, run_id, timeout=1)["state_type"])
        time.sleep(0.02)
    family = _process_tree(run_id)
    assert family, ("no process of the run found", wait(url, run_id, timeout=1)["state_type"])
    for proc in family:
        proc.kill()
    crashed = wait(url, run_id, timeout=120)
    assert crashed["state_type"] == "CRASHED", (crashed["state"], logs(url, run_id)[-1500:])
    retry = wait(url, start(url, "pipeline", overrides=overrides, pull=False, push=False), timeout=400)
    text = logs(url, retry["id"])
    assert retry["state_type"] == "COMPLETED", text[-2000:]
    assert f"resuming from {project / 'checkpoints'}/" in text, "a new workspace resumes from the clone's checkpoints"
    assert "Running stage 'prepare'" not in text, "the finished prepare stage must be skipped"
    assert (project / "params.yaml").read_text() == params_before, "overrides must not outlive the run"


def _process_tree(run_id: str) -> list[psutil.Process]:
    """The run's flow-run process (the worker started it with PREFECT__FLOW_RUN_ID) and all below it."""
    for proc in psutil.process_iter(["pid"]):
        if _env(proc).get("PREFECT__FLOW_RUN_ID") == run_id:
            with contextlib.suppress(psutil.Error):
                return [proc, *proc.children(recursive=True)]
    return []


def _env(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return {}


def one_sentence_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_worker_bad_input_is_one_sentence(cluster):
    project, url = cluster
    pool = run(project, "tunedeck", "worker", "--pool", "nope", check=False, PREFECT_API_URL=url)
    assert "work pool 'nope' does not exist" in one_sentence_error(pool)
    gpu = run(project, "tunedeck", "worker", "--gpus", "0,3", check=False, PREFECT_API_URL=url, TUNEDECK_FAKE_GPUS="2")
    assert "GPU 3 does not exist on this host (its GPUs: 0,1)" in one_sentence_error(gpu)


def test_server_unreachable_is_one_sentence(cluster):
    project, _ = cluster
    proc = run(project, "tunedeck", "deploy", check=False, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    assert "does not answer" in one_sentence_error(proc)  # how soon: bench/responsiveness.py


def test_an_override_with_an_unknown_key_fails_the_run_with_its_sentence(cluster):
    project, url = cluster
    failed = wait(url, start(url, "pipeline", overrides=["train.lrr=0.1"], pull=False, push=False))
    assert failed["state_type"] == "FAILED"
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in failed["state"]["message"]
    assert "lrr" not in (project / "params.yaml").read_text()
    assert not (project / ".tunedeck" / "params.before-run.yaml").exists()


def test_data_watch_starts_the_pipeline_only_when_the_data_changed(cluster):
    import shutil as _shutil

    project, url = cluster
    pipeline_id = deployment_id(url, "pipeline")

    def pipeline_runs() -> list[dict]:
        return api(url, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [pipeline_id]}}})

    def log_has(run_id: str, text: str, timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout  # a run's last log lines reach the server in batches
        while text not in logs(url, run_id):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    run(project, "dvc", "repro", "prepare", TUNEDECK_PREFECT="off")  # the data as DVC last saw it
    before = len(pipeline_runs())
    quiet = wait(url, start(url, "data-watch"))
    assert quiet["state_type"] == "COMPLETED" and log_has(quiet["id"], "data unchanged")
    assert len(pipeline_runs()) == before
    extra = project / "data" / "tiny" / "red" / "new.png"
    _shutil.copy(project / "data" / "tiny" / "red" / "000.png", extra)
    try:
        noticed = wait(url, start(url, "data-watch"))
        assert noticed["state_type"] == "COMPLETED", logs(url, noticed["id"])[-1500:]
        assert log_has(noticed["id"], "data changed (data/tiny): starting pipeline/pipeline"), logs(url, noticed["id"])[-1500:]
        started = pipeline_runs()
        assert len(started) == before + 1, "data-watch must start exactly one pipeline run"
        newest = max(started, key=lambda r: r["expected_start_time"])
        assert wait(url, newest["id"])["state_type"] == "COMPLETED"
    finally:
        extra.unlink(missing_ok=True)


def test_the_train_deployment_runs_a_named_experiment_shown_by_dvc(cluster):
    project, url = cluster
    bad = wait(url, start(url, "train", overrides=["train.lrr=0.1"], name="td-bad"))
    assert bad["state_type"] == "FAILED" and "did you mean 'train.lr'" in bad["state"]["message"]
    done = wait(url, start(url, "train", overrides=["train.epochs=3"], name="td-exp"))
    assert done["state_type"] == "COMPLETED", logs(url, done["id"])[-2000:]
    shown = run(project, "dvc", "exp", "show", "--json").stdout
    assert "td-exp" in shown and "td-bad" not in shown
