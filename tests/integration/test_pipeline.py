"""A full `dvc repro` in a temporary copy of the repo, on tiny data, with a real local Prefect server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest
import yaml

from flows.host import server
from tests.integration.project import api, free_port, make_project, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def prefect(project):
    url = server.start(free_port(), root=project)
    yield url
    server.stop(root=project)


def flow_runs(url: str) -> list[tuple[str, str, dict, list[str]]]:
    """(flow name, state, parameters, tags) of every flow run on the server."""
    names = {f["id"]: f["name"] for f in api(url, "flows/filter")}
    runs = api(url, "flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
    return [(names[r["flow_id"]], r["state_type"], r["parameters"], r["tags"]) for r in runs]


@pytest.fixture(scope="module")
def reproduced(project, prefect):
    """`dvc repro` in the project, then again: both outputs and the flow runs each one made.

    Both happen here, before any test changes the project (a test that kills a stage leaves a
    checkpoint behind, an experiment leaves its params), so the tests below hold in any order.
    """
    before = len(flow_runs(prefect))
    files_before = set((project / ".tunedeck" / "runs").glob("*.json"))  # a stage killed by another test leaves its own
    first = run(project, "dvc", "repro", TUNEDECK_PRICE_PER_HOUR="2.5")  # a price per device-hour: the run's cost
    runs = flow_runs(prefect)[before:]
    ids = [r["id"] for r in api(prefect, "flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})[before:]]
    left = set((project / ".tunedeck" / "runs").glob("*.json")) - files_before
    scores = scores_of(project)  # now: a later test may train another model (CI on 71a8b15, seed 8512)
    cost = json.loads((project / "dvclive" / "metrics.json").read_text())["cost"]  # the same
    second = run(project, "dvc", "repro")
    return first, runs, second, len(flow_runs(prefect)) - before - len(runs), ids, left, scores, cost


def test_dvc_repro_runs_every_stage_as_a_completed_flow_run(project, prefect, reproduced):
    proc, runs, _, _, ids, left, scores, _ = reproduced
    assert "Running stage 'evaluate'" in proc.stdout
    for out in ("data/prepared/train_x.npy", "models/model.safetensors", "models/model.json", "eval/metrics.json",
                "eval/reliability.json", "export/model.onnx"):
        assert (project / out).is_file(), out
    assert [(name, state) for name, state, _, _ in runs] == [
        ("prepare", "COMPLETED"), ("train", "COMPLETED"), ("evaluate", "COMPLETED"), ("export", "COMPLETED"),
    ]
    parity = json.loads((project / "export" / "parity.json").read_text())
    assert parity["top1_agreement"] == 1.0 and parity["max_prob_diff"] <= 1e-4 and parity["batch_sizes"] == [1, 7]
    assert {"ece", "nll", "brier"} <= set(json.loads((project / "eval" / "metrics.json").read_text()))
    _, _, parameters, tags = runs[1]
    assert parameters["params"]["model"]["name"] == "test_resnet"
    lock = (project / "dvc.lock").read_text()
    data_tag = next(t for t in tags if t.startswith("data:"))
    assert data_tag.removeprefix("data:") in lock, "the data version on the run is DVC's md5 of data.source"
    assert any(t.startswith("model:") for t in runs[2][3])
    train_id = ids[1]
    train_log = [e["message"] for e in api(prefect, "logs/filter", {"logs": {"flow_run_id": {"any_": [train_id]}}, "limit": 200})]
    assert any(m.startswith("epoch 1/") for m in train_log), "the stage's log must reach its flow run"
    assert not left, "run files must go when stages end"
    artifacts = api(prefect, "artifacts/filter")
    assert {a["key"] for a in artifacts} >= {"prepare-summary", "train-summary", "evaluate-summary"}
    evaluated = next(a["data"] for a in artifacts if a["key"] == "evaluate-summary")  # the run detail's summary
    assert re.search(r"\| explanations \| eval/explain/ \(\d+ Grad-CAM overlays, e\.g\. ", evaluated), evaluated
    assert "| gradcam_sanity_rho |" in evaluated
    # what the dashboard reads of these runs has the shape the demo's fakes were recorded with
    from tui.providers.models import RunQuery
    from tui.providers.prefect_api import PrefectApi
    from tui.providers.shapes import shape, templates

    seen = {r.id: r for r in PrefectApi(prefect).snapshot(RunQuery(limit=200)).runs}
    for stage, run_id in zip(("prepare", "train", "evaluate"), ids[:3], strict=True):
        assert shape(seen[run_id]) == shape(templates()[f"{stage}:final"]), (stage, seen[run_id])
    assert dict(seen[ids[2]].scores) == scores, "the evaluate run lacks its test scores"


def scores_of(project) -> dict[str, float]:
    """What the dashboard's TEST and F1 columns should show for the project's eval/metrics.json."""
    metrics = json.loads((project / "eval" / "metrics.json").read_text())
    return {"test/acc": pytest.approx(metrics["accuracy"], abs=1e-6), "test/macro_f1": pytest.approx(metrics["macro_f1"], abs=1e-6)}


def test_every_evaluate_run_carries_its_test_scores(project, prefect, reproduced):
    """evaluate sends its scores just before it ends: they must reach its run every time, not race its end
    (they were lost in 1 run of 3 on a quiet machine, so the stage runs five times)."""
    from tui.providers.models import RunQuery
    from tui.providers.prefect_api import PrefectApi

    for attempt in range(5):
        before = {r["id"] for r in api(prefect, "flow_runs/filter")}
        run(project, "python", "-m", "flows.stages.evaluate", PREFECT_API_URL=prefect)
        new = [r["id"] for r in api(prefect, "flow_runs/filter") if r["id"] not in before]
        assert len(new) == 1, new
        seen = {r.id: r for r in PrefectApi(prefect).snapshot(RunQuery(limit=200)).runs}
        assert dict(seen[new[0]].scores) == scores_of(project), f"run {attempt + 1} of 5 lacks its test scores"


def test_second_repro_is_a_noop(reproduced):
    _, _, second, new_runs, _, _, _, _ = reproduced
    assert "Data and pipelines are up to date" in second.stdout
    assert new_runs == 0


def test_metrics_plots_and_experiments(project, reproduced):
    """Also the training's energy and cost (flows.gateways.power) among the metrics `dvc exp show` has: the CPU's
    energy where RAPL is readable here, "unknown" where not, never zero."""
    from flows.gateways.power import rapl_packages, read_rapl

    metrics = json.loads(run(project, "dvc", "metrics", "show", "--json").stdout)
    assert "accuracy" in json.dumps(metrics)
    cost = reproduced[7]  # the first repro's, priced at 2.5 a device-hour
    assert cost["price_per_hour"] == 2.5 and cost["total"] == pytest.approx(cost["device_hours"] * 2.5, abs=1e-6), cost
    run(project, "dvc", "plots", "show", "-o", "plots")
    assert (project / "plots" / "index.html").is_file()
    run(project, "dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1")
    shown = run(project, "dvc", "exp", "show", "--csv").stdout
    assert "one-epoch" in shown and "train.epochs" in shown
    header, *rows = shown.splitlines()
    assert "energy.cpu_wh" in header and "cost.device_hours" in header, header
    row = next(dict(zip(header.split(","), r.split(","), strict=False)) for r in rows if "one-epoch" in r)
    cpu_wh = row[next(k for k in row if k.endswith("energy.cpu_wh"))]
    readable = read_rapl(rapl_packages()) is not None
    assert (float(cpu_wh) > 0) if readable else cpu_wh == "unknown", row
    assert float(row[next(k for k in row if k.endswith("cost.device_hours"))]) > 0, row


@contextlib.contextmanager
def long_train_stage(project, devices: int = 1, epochs: int = 500):
    """A long train stage from scratch on devices processes, started once its flow run is open; params.yaml put back after.

    (An earlier test's `dvc exp run` may have left any epochs in params.yaml, so it is set through YAML.)
    """
    from tests.integration.project import env

    params = (project / "params.yaml").read_text()
    raw = yaml.safe_load(params)
    raw["train"]["epochs"] = epochs
    raw["base"]["devices"] = devices
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.rmtree(project / "checkpoints", ignore_errors=True)
    proc = subprocess.Popen(["python", "-m", "flows.stages.train"], cwd=project, env=env(), stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stderr:
            if line.startswith("prefect: flow run"):
                break
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        (project / "params.yaml").write_text(params)


def train_runs(url: str) -> list[dict]:
    names = {f["id"]: f["name"] for f in api(url, "flows/filter")}
    runs = api(url, "flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC"})
    return [r for r in runs if names[r["flow_id"]] == "train"]


def state_of_new_run(url: str, before: int, wait: float = 120.0) -> tuple[str, str]:
    """(state type, message) of the train run started after ``before`` runs existed, once final.

    ``wait`` only guards against a hang: bench/responsiveness.py measures how soon the state comes.
    """
    deadline = time.monotonic() + wait
    while True:
        runs = train_runs(url)
        if len(runs) > before:
            newest = runs[0]
            if newest["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
                return newest["state_type"], newest["state"]["message"] or ""
        elif time.monotonic() > deadline:
            return "NONE", "no new run"
        time.sleep(0.3)


def test_bad_input_fails_the_flow_run_with_its_sentence(project, prefect, reproduced):
    params = (project / "params.yaml").read_text()
    try:
        (project / "params.yaml").write_text(params.replace("name: test_resnet", "name: resnet-18"))
        before = len(train_runs(prefect))
        proc = run(project, "python", "-m", "flows.stages.train", check=False)
    finally:
        (project / "params.yaml").write_text(params)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    state, message = state_of_new_run(prefect, before)
    assert state == "FAILED" and "is not a timm model" in message


def test_a_killed_stage_is_crashed_at_once(project, prefect, reproduced):
    before = len(train_runs(prefect))
    with long_train_stage(project) as proc:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state, message = state_of_new_run(prefect, before)
        assert state == "CRASHED" and "ended before finishing" in message


def test_a_run_cancelled_from_the_api_stops_its_stage(project, prefect, reproduced):
    """Cancel (as the dashboard or `prefect flow-run cancel` do): the stage process stops, the run ends Cancelled."""
    before = len(train_runs(prefect))
    with long_train_stage(project) as proc:
        run_id = train_runs(prefect)[0]["id"]
        api(prefect, f"flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
        rest = proc.communicate(timeout=120)[1]  # a hang guard: bench/responsiveness.py measures how soon
        assert proc.returncode == 128 + 15, rest[-2000:]
        assert "tunedeck: the train stage was stopped (a cancel from the dashboard or Prefect, or a kill)" in rest
        state, message = state_of_new_run(prefect, before)
        assert state == "CANCELLED" and "the train stage process was stopped" in message, (state, message)


@pytest.mark.parametrize("stop", ["cancel", "kill -9"])
def test_a_stopped_ddp_stage_leaves_no_process_behind(project, prefect, reproduced, stop):
    """Cancel or kill -9 a 2-process DDP stage: torchrun and both of its workers stop with it, none left holding a GPU."""
    before = len(train_runs(prefect))
    with long_train_stage(project, devices=2, epochs=10_000) as proc:
        stage = psutil.Process(proc.pid)
        deadline = time.monotonic() + 90  # a hang guard: torchrun starts both workers in seconds
        while len(workers := [p for p in stage.children(recursive=True) if "-u -m flows.stages.train" in command(p)]) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "the two DDP workers never started"
            time.sleep(0.5)
        family = stage.children(recursive=True)
        try:
            if stop == "cancel":
                run_id = train_runs(prefect)[0]["id"]
                api(prefect, f"flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
                assert proc.wait(timeout=60) == 128 + 15  # a hang guard: the cancel stops it in about 2 s
            else:
                proc.kill()
                proc.wait()
            _, alive = psutil.wait_procs(family, timeout=60)  # a hang guard: they die with the stage
            assert not alive, f"left running after {stop}: {[command(p) for p in alive]} (of {len(workers)} workers)"
        finally:
            for orphan in family:
                with contextlib.suppress(psutil.Error):
                    orphan.kill()
        state, _ = state_of_new_run(prefect, before)
        assert state == ("CANCELLED" if stop == "cancel" else "CRASHED")


def command(process: psutil.Process) -> str:
    """A process's command line, or "" once it is gone."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def test_server_down_the_stage_says_so_and_runs(tmp_path):
    """A project whose server is not running (a copy of its own: the module's server stays up for the others)."""
    alone = make_project(tmp_path / "alone")
    proc = run(alone, "dvc", "repro", "prepare")
    assert "no Prefect server is running" in proc.stderr + proc.stdout
    assert (alone / "data" / "prepared" / "manifest.json").is_file()
    assert run(alone, "tunedeck", "server", "status", check=False).returncode == 3


def test_a_stage_that_ends_during_a_server_outage_shows_its_end_once_the_server_is_back(tmp_path):
    """kill -9 of the server while the train stage runs; the stage finishes; the server restarts: the run reads COMPLETED."""
    project = make_project(tmp_path / "outage")
    port = free_port()
    url = server.start(port, root=project)
    try:
        run(project, "dvc", "repro", "prepare", TUNEDECK_PREFECT="off")
        with long_train_stage(project, epochs=40) as proc:
            run_id = train_runs(url)[0]["id"]
            os.kill(json.loads((project / ".tunedeck" / "server.json").read_text())["pid"], signal.SIGKILL)
            rest = proc.communicate(timeout=600)[1]  # a hang guard: 40 tiny epochs
            assert proc.returncode == 0, rest[-2000:]
            assert "its flow run gets its final state as soon as the server is back" in rest, rest[-2000:]
            assert server.start(port, root=project) == url
            restarted = time.monotonic()
            deadline = restarted + 120  # a hang guard; the reporter tries every 2 s (0.6 s after the restart, README)
            while (state := api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]["state_type"]) != "COMPLETED":
                assert time.monotonic() < deadline, f"still {state} 120 s after the server came back"
                time.sleep(0.5)
            print(f"COMPLETED {time.monotonic() - restarted:.1f} s after the restart")
            reporters = [p for p in psutil.process_iter(["cmdline"]) if "flows.stages.reporter" in " ".join(p.info["cmdline"] or [])
                         and _cwd(p) == str(project)]
            _, alive = psutil.wait_procs(reporters, timeout=60)  # a hang guard: it exits once the state is set
            assert not alive, "the stage's reporter stayed behind after setting the run's end"
    finally:
        server.stop(root=project)


def _cwd(process: psutil.Process) -> str:
    """A process's working folder, or "" once it is gone."""
    try:
        return process.cwd()
    except psutil.Error:
        return ""
