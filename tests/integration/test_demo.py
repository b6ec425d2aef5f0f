"""`tunedeck demo` end to end in a temporary copy: transfer beats scratch, every stage a Completed run."""

from __future__ import annotations

import shutil

import pytest

from flows import server
from tests.conftest import ROOT
from tests.integration.project import free_port, make_project, run
from tests.integration.test_pipeline import flow_runs

pytestmark = pytest.mark.slow


def test_demo_transfer_beats_scratch(tmp_path):
    project = make_project(tmp_path / "demo")
    shutil.copy2(ROOT / "params.yaml", project / "params.yaml")  # the real defaults
    run(project, "git", "commit", "-qam", "real params")
    url = server.start(free_port(), root=project)
    try:
        proc = run(project, "tunedeck", "demo", PREFECT_API_URL=url)
        runs = flow_runs(url)
    finally:
        server.stop(root=project)
    table = proc.stdout[proc.stdout.index("test accuracy"):]
    transfer = float(table.split("transfer from 0-4 backbone")[1].split("%")[0])
    scratch = float(table.split("from scratch, same budget")[1].split("%")[0])
    assert transfer > scratch + 5, table
    assert runs and all(state == "COMPLETED" for _, state, _, _ in runs), runs
    assert {name for name, *_ in runs} == {"prepare", "train", "evaluate"}
    assert (project / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    assert (project / "weights" / "demo-source.safetensors").is_file()
    shown = run(project, "dvc", "exp", "show", "--csv").stdout
    assert all(name in shown for name in ("demo-source", "demo-scratch", "demo-transfer"))
