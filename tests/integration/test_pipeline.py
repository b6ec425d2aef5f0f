"""A full `dvc repro` in a temporary copy of the repo, on tiny data, with a real local Prefect server."""

from __future__ import annotations

import json
import urllib.request

import pytest

from flows import server
from tests.integration.project import free_port, make_project, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("project"))


@pytest.fixture(scope="module")
def prefect(project):
    url = server.start(free_port(), root=project)
    yield url
    server.stop(root=project)


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{url}/{path}", data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def flow_runs(url: str) -> list[tuple[str, str, dict, list[str]]]:
    """(flow name, state, parameters, tags) of every flow run on the server."""
    names = {f["id"]: f["name"] for f in api(url, "flows/filter")}
    runs = api(url, "flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
    return [(names[r["flow_id"]], r["state_type"], r["parameters"], r["tags"]) for r in runs]


def test_dvc_repro_runs_every_stage_as_a_completed_flow_run(project, prefect):
    proc = run(project, "dvc", "repro")
    assert "Running stage 'evaluate'" in proc.stdout
    for out in ("data/prepared/train_x.npy", "models/model.safetensors", "models/model.json", "eval/metrics.json"):
        assert (project / out).is_file(), out
    runs = flow_runs(prefect)
    assert [(name, state) for name, state, _, _ in runs] == [
        ("prepare", "COMPLETED"), ("train", "COMPLETED"), ("evaluate", "COMPLETED"),
    ]
    _, _, parameters, tags = runs[1]
    assert parameters["params"]["model"]["name"] == "test_resnet"
    lock = (project / "dvc.lock").read_text()
    data_tag = next(t for t in tags if t.startswith("data:"))
    assert data_tag.removeprefix("data:") in lock, "the data version on the run is DVC's md5 of data.source"
    assert any(t.startswith("model:") for t in runs[2][3])
    artifacts = api(prefect, "artifacts/filter")
    assert {a["key"] for a in artifacts} >= {"prepare-summary", "train-summary", "evaluate-summary"}


def test_second_repro_is_a_noop(project, prefect):
    before = len(flow_runs(prefect))
    proc = run(project, "dvc", "repro")
    assert "Data and pipelines are up to date" in proc.stdout
    assert len(flow_runs(prefect)) == before


def test_metrics_plots_and_experiments(project, prefect):
    metrics = json.loads(run(project, "dvc", "metrics", "show", "--json").stdout)
    assert "accuracy" in json.dumps(metrics)
    run(project, "dvc", "plots", "show", "-o", "plots")
    assert (project / "plots" / "index.html").is_file()
    run(project, "dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1")
    shown = run(project, "dvc", "exp", "show", "--csv").stdout
    assert "one-epoch" in shown and "train.epochs" in shown


def test_server_down_the_stage_says_so_and_runs(project, prefect):
    server.stop(root=project)
    proc = run(project, "dvc", "repro", "-f", "evaluate")
    assert "no Prefect server is running" in proc.stderr + proc.stdout
    assert (project / "eval" / "metrics.json").is_file()
    assert run(project, "tunedeck", "server", "status", check=False).returncode == 3
