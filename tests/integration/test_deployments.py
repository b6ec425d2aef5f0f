"""Deployments through real Prefect workers on 127.0.0.1: deploy, run, one GPU slot, crash and resume."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import yaml

from flows.gateways.gpus import stand_in_env
from flows.host import server
from flows.host.plan import Record
from flows.ship.registry import next_version, prod
from tests.conftest import write_images
from tests.integration.project import FINAL, api, checkpoint_written, env, free_port, make_project, run, wait

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A tiny project, its Prefect server, the deployments, and two workers sharing one fake GPU."""
    project = make_project(tmp_path_factory.mktemp("deploy"))
    url = server.start(free_port(), root=project)
    workers = []
    try:
        run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
        for n in range(2):
            workers.append(subprocess.Popen(
                ["tunedeck", "worker", "--pool", "local", "--gpus", "0"], cwd=project,
                env=env(PREFECT_API_URL=url, PREFECT_LOGGING_LEVEL="INFO", **stand_in_env(1, project.parent / "stand-in-gpus")),
                stdout=subprocess.DEVNULL, stderr=open(project.parent / f"worker-{n}.log", "w"), start_new_session=True,
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
    declared = yaml.safe_load((project / "prefect.yaml").read_text())["deployments"]
    assert again.returncode == 0 and len(api(url, "deployments/filter")) == len(declared)


def test_predict_deployment_labels_a_folder_with_the_prod_model(cluster, tmp_path):
    project, url = cluster
    if not run(project, "git", "tag", "--list", "model#prod#*").stdout.strip():
        assert wait(url, start(url, "pipeline"), timeout=400)["state_type"] == "COMPLETED"
    images = write_images(tmp_path / "new", {"red": 3, "green": 3, "blue": 3})
    (images / "red" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "labels.csv"
    flow_run = wait(url, start(url, "predict", input=str(images), out=str(out)))
    assert flow_run["state_type"] == "COMPLETED", logs(url, flow_run["id"])[-2000:]
    rows = out.read_text().splitlines()
    assert len(rows) == 1 + 9 and rows[0].startswith("path,label,confidence"), rows[:3]
    assert "broken.png" in out.with_name("labels.errors.csv").read_text()


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
    """kill -9 of a run's process tree while it trains: Crashed; the same run again resumes from its checkpoint,
    and its model is the very file (sha256) an uninterrupted run with the same overrides trains.

    The kill waits on the event (this run's first checkpoint on disk), never on time: 37 epochs
    are left to go then (about 6 s here, 0.17 s an epoch; the kill takes well under one), so it
    lands mid-training on a machine many times faster too.
    """
    project, url = cluster
    params_before = (project / "params.yaml").read_text()
    overrides = ["train.epochs=40", "train.checkpoint_every=3"]
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
    # its worker saw every process of the run end and freed its GPU slot (the lease the run recorded), so the
    # rerun need not wait for the lease to run out (a minute or more)
    leases = project / ".tunedeck" / "leases"
    deadline = time.monotonic() + 60  # a hang guard: the worker looks every 2 s, 5 s after a run's processes went
    while list(leases.glob(f"{run_id}.*")):
        assert time.monotonic() < deadline, "the dead run's slot lease was never freed by its worker"
        time.sleep(0.2)
    assert [limit["active_slots"] for limit in api(url, "v2/concurrency_limits/filter")] == [0], "the GPU slot is free"
    retry = wait(url, start(url, "pipeline", overrides=overrides, pull=False, push=False), timeout=400)
    text = logs(url, retry["id"])
    assert retry["state_type"] == "COMPLETED", text[-2000:]
    assert f"resuming from {project / 'checkpoints'}/" in text, "a new workspace resumes from the clone's checkpoints"
    assert "Running stage 'prepare'" not in text, "the finished prepare stage must be skipped"
    assert (project / "params.yaml").read_text() == params_before, "overrides must not outlive the run"
    # the baseline: the same overrides from scratch (no checkpoint to resume from, no DVC run-cache to restore)
    shutil.rmtree(project / "checkpoints", ignore_errors=True)
    shutil.rmtree(project / ".dvc" / "cache" / "runs", ignore_errors=True)
    whole = wait(url, start(url, "pipeline", overrides=overrides, pull=False, push=False), timeout=400)
    assert whole["state_type"] == "COMPLETED", logs(url, whole["id"])[-2000:]
    assert checkpoint_written(project / "checkpoints"), "the baseline trained (its own checkpoints), not restored"
    assert model_sha256(url, retry["id"]) == model_sha256(url, whole["id"]), "a resumed run trains the same model"


def model_sha256(url: str, run_id: str) -> str:
    """The sha256 of a finished pipeline run's model, from its `versions` artifact (the tags keep 12 digits)."""
    artifacts = api(url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    versions = next(a["data"] for a in artifacts if a["key"] == "versions")
    return re.search(r"\| model_sha256 \| ([0-9a-f]{64}) \|", versions).group(1)


def _process_tree(run_id: str) -> list[psutil.Process]:
    """The run's flow-run process (the worker started it with PREFECT__FLOW_RUN_ID) and all below it.

    The first started of the processes carrying the run's id, not the lowest pid: its stages and their servers
    inherit the variable, and once pids wrap (32768 of them go quickly in a full suite) one of those can have a
    lower pid than the flow-run process: killing that tree alone left the run alive (CI on 43102a9)."""
    carrying = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        if _env(proc).get("PREFECT__FLOW_RUN_ID") == run_id:
            carrying.append(proc)
    for proc in sorted(carrying, key=lambda p: (p.info["create_time"], p.pid)):
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
    gpu = run(project, "tunedeck", "worker", "--gpus", "0,3", check=False, PREFECT_API_URL=url,
              **stand_in_env(2, project.parent / "stand-in-gpus-2"))
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
        deadline = time.monotonic() + timeout  # a hang guard: a run's last log lines reach the server in batches
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


def _row(table, key: str) -> dict[str, str]:
    """The cells of one row of a dashboard table, by column key, as shown."""
    if key not in table.runs:
        return {}
    return {column: str(table.get_cell(key, column)) for column in table.column_keys}


@pytest.mark.anyio
async def test_train_progress_reaches_another_folders_dashboard_through_the_api_alone(cluster, tmp_path, monkeypatch):
    """While a deployment run trains, its stage, epoch k/N, val metric and ETA are on the Prefect server (labels);
    the dashboard, started in a folder with no project files, shows them in its runs table."""
    from flows.contracts import StageProgress, stage_label
    from tests.tui.conftest import settle
    from tui.app import make_app
    from tui.providers import live_providers
    from tui.widgets.runs_table import RunsTable

    project, url = cluster
    monkeypatch.chdir(tmp_path)  # no dvclive, no params.yaml, no run files here: only the server
    monkeypatch.setenv("PREFECT_API_URL", url)
    app = make_app(providers=live_providers(), refresh_s=0.25)
    async with app.run_test(size=(170, 44)) as pilot:
        run_id = start(url, "pipeline", overrides=["train.epochs=60"], pull=False, push=False)
        table = app.screen.query_one(RunsTable)
        from_api = on_screen = None
        deadline = time.monotonic() + 300  # a hang guard
        while from_api is None or on_screen is None:
            assert time.monotonic() < deadline, "no progress seen while the run trained"
            flow_run = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]
            assert flow_run["state_type"] not in FINAL, ("the run ended before its progress was seen", flow_run["labels"])
            progress = StageProgress.from_labels(flow_run["labels"])
            if from_api is None and stage_label(flow_run["labels"]) == "train" and progress and progress.epoch >= 2:
                from_api = progress
            row = _row(table, run_id)
            if on_screen is None and row.get("stage") == "train" and row.get("epoch", "").endswith("/60") and row.get("acc"):
                on_screen, real_running = row, table.runs[run_id]
            await settle(pilot, 1)
            await pilot.pause(0.1)
    assert from_api.epochs == 60 and 0.0 <= from_api.metrics["val/acc"] <= 1.0, from_api
    assert {"train/loss", "samples_per_s"} <= set(from_api.metrics) and from_api.eta_s is not None, from_api
    assert on_screen["state"].startswith("Running") and on_screen["eta"], on_screen
    done = wait(url, run_id, timeout=400)
    assert done["state_type"] == "COMPLETED", logs(url, run_id)[-2000:]
    final = StageProgress.from_labels(done["labels"])
    assert final is not None and final.epoch == final.epochs == 60, done["labels"]
    assert done["labels"]["tunedeck.host"], done["labels"]
    # real runs have the shapes the demo's fakes were recorded with (tui/providers/recorded.json)
    from tui.providers.models import RunQuery
    from tui.providers.prefect_api import PrefectApi
    from tui.providers.shapes import shape, templates

    assert shape(real_running) == shape(templates()["pipeline:running"]), real_running
    real_done = next(r for r in PrefectApi(url).snapshot(RunQuery(limit=200)).runs if r.id == run_id)
    assert shape(real_done) == shape(templates()["pipeline:final"]), real_done


def test_a_pipeline_run_goes_to_the_host_plan_picks_runs_through_its_worker_and_pushes_to_the_dvc_remote(cluster):
    """`tunedeck plan` on recorded throughput of two stand-in hosts at the job's params (this one, slower and
    cheaper, as a real run records it: asserted below on this run's own labels; another, faster and dearer): a
    tight deadline picks the other (its queue, which no worker here polls, keeps the run Scheduled), one nobody
    meets is one sentence and exit 2, a loose one picks this host, and --run puts the pipeline on this host's work
    queue, which its worker takes: the run trains, pushes, is a DVC experiment, and the gate registers its model.
    With a tolerance of 1 the gate's verdict is certain whatever ran before in this module (the exact verdicts on
    known-better and known-worse candidates: test_gate.py and tests/unit/test_promotion.py)."""
    from flows.gateways.gpus import host

    project, url = cluster
    version = next_version(project)
    flow = api(url, "flows/", {"name": "pipeline"})["id"]
    for name, device, spie, overhead, price in ((host(), "cpu: stand-in (2 threads)", 0.05, 3.0, 0.5),
                                                 ("stand-in-fast", "cuda: stand-in GPU", 0.001, 1.0, 20.0)):
        wall = spie * 18 * 2 + overhead
        labels = {"tunedeck.host": name, "tunedeck.throughput.device": device, "tunedeck.throughput.model": "test_resnet",
                  "tunedeck.throughput.image_size": 16, "tunedeck.throughput.batch": 4,
                  "tunedeck.throughput.s_per_image_epoch": spie, "tunedeck.throughput.overhead_s": overhead,
                  "tunedeck.throughput.images": 18, "tunedeck.throughput.epochs": 2,
                  "tunedeck.cost.price_per_hour": price, "tunedeck.cost.total": round(wall / 3600 * price, 6)}
        api(url, "flow_runs/", {"flow_id": flow, "state": {"type": "COMPLETED"}, "labels": labels})
    # batch 4: params no other test of this module trains with, so this run trains (DVC's run cache would skip it)
    job = ["-S", "train.batch_size=4", "-S", "promote.tolerance=1.0", "-S", "promote.max_class_drop=1.0"]
    tight = run(project, "tunedeck", "plan", "--deadline", "3s", *job, PREFECT_API_URL=url)
    assert "pick: stand-in-fast" in tight.stdout, tight.stdout
    nobody = run(project, "tunedeck", "plan", "--deadline", "0.5s", *job, check=False, PREFECT_API_URL=url)
    assert nobody.returncode == 2 and "no host meets the deadline" in nobody.stderr, nobody.stderr
    elsewhere = run(project, "tunedeck", "plan", "--deadline", "3s", "--run", *job, PREFECT_API_URL=url).stdout
    elsewhere_id = re.search(r"started pipeline run (\S+) ", elsewhere).group(1)
    loose = run(project, "tunedeck", "plan", "--deadline", "1h", "--run", *job, PREFECT_API_URL=url).stdout
    assert f"pick: {host()} (the cheapest that meets the deadline)" in loose, loose
    flow_run = wait(url, re.search(r"started pipeline run (\S+) ", loose).group(1))
    assert flow_run["state_type"] == "COMPLETED", logs(url, flow_run["id"])[-2000:]
    assert flow_run["work_queue_name"] == f"host-{host()}", flow_run
    waiting = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [elsewhere_id]}}})[0]
    api(url, f"flow_runs/{elsewhere_id}/set_state", {"state": {"type": "CANCELLED"}, "force": True})
    assert waiting["state_type"] == "SCHEDULED" and waiting["work_queue_name"] == "host-stand-in-fast", waiting

    assert flow_run["name"] in run(project, "dvc", "exp", "show", "--csv").stdout, "the run is a DVC experiment"
    assert {t.split(":")[0] for t in flow_run["tags"]} >= {"data", "model"}, flow_run["tags"]
    labels = flow_run["labels"]  # the training's cost and energy: on a CPU here ("unknown" where RAPL is unreadable)
    assert labels.get("tunedeck.cost.device_hours", 0) > 0 and "tunedeck.energy.cpu_wh" in labels, labels
    record = Record.from_labels(labels)  # its throughput, as `tunedeck plan` reads it (and as the fakes above have it)
    assert record and (record.host, record.model, record.image_size, record.batch) == (host(), "test_resnet", 16, 4)
    assert record.device.startswith("cpu: ") and record.images == 18 and record.s_per_image_epoch > 0, labels
    pushed = list((project / "dvc-remote").rglob("*"))
    assert any(p.is_file() for p in pushed), "dvc push put nothing on the remote"
    assert "holding GPU 0" in logs(url, flow_run["id"])
    artifacts = api(url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    versions = next(a["data"] for a in artifacts if a["key"] == "versions")
    for field in ("code", "data_version", "model_sha256", "accuracy"):
        assert f"| {field} |" in versions, versions
    verdict = next(a for a in artifacts if a["key"] == "promotion")  # the gate: the pipeline's last step
    assert verdict["description"].startswith("promoted: "), verdict
    registered = run(project, "git", "tag", "--list", f"model@{version}").stdout.split()
    assert registered == [f"model@{version}"], f"the run's model is registered as {version}"
    assert prod(project).version == version
