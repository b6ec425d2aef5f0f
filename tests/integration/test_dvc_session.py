"""The pipeline's long-lived DVC helper: up-to-date keys, streamed stage output, failures in one sentence."""

from __future__ import annotations

import subprocess

import pytest

from flows.core.errors import TunedeckError
from flows.gateways.dvc.session import DvcSession
from tests.integration.project import env

pytestmark = pytest.mark.slow


def test_keys_repro_and_failures(tmp_path):
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env(), check=True, capture_output=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  hello:\n    cmd: echo \"hi $TUNEDECK_PROBE\" && echo hi > out.txt\n    outs: [out.txt]\n"
        "  probe:\n    cmd: echo \"probe=$TUNEDECK_PROBE\"\n    always_changed: true\n"
        "  kill-helper:\n    cmd: kill -9 $PPID\n    always_changed: true\n"
        "  broken:\n    cmd: echo about to fail && exit 3\n"
    )
    lines: list[str] = []
    with DvcSession(tmp_path) as dvc:
        assert dvc.up_to_date_key("hello") is None, "never run: must run"
        dvc.repro("hello", {"TUNEDECK_PROBE": "from-env"}, on_line=lines.append)
        assert "Running stage 'hello':" in lines and "hi from-env" in lines, lines
        key = dvc.up_to_date_key("hello")
        assert key and key.startswith("dvc-hello-") and dvc.up_to_date_key("hello") == key
        with pytest.raises(TunedeckError, match=r"`dvc repro --single-item broken` failed \(exit \d+\): .*about to fail"):
            dvc.repro("broken")
        dvc.repro("probe", {"TUNEDECK_PROBE": "set"}, on_line=lines.append)  # still answers after a failure
        dvc.repro("probe", on_line=lines.append)
        assert [line for line in lines if line.startswith("probe=")] == ["probe=set", "probe="], (
            "the env of one request must not leak into the next")
        with pytest.raises(TunedeckError, match=r"the DVC helper process exited \(status -9\) while asked `dvc repro --single-item"):
            dvc.repro("kill-helper")
        assert dvc.up_to_date_key("hello") == key, "a dead helper is replaced on the next question"


def test_stage_order_is_dvcs_own_graph_dependencies_first(tmp_path):
    """Stages written in dvc.yaml in another order, and a .dvc-tracked file: DVC's graph orders them."""
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, env=env(), check=True, capture_output=True)
    (tmp_path / "raw.txt").write_text("raw\n")
    subprocess.run(["dvc", "add", "-q", "raw.txt"], cwd=tmp_path, env=env(), check=True, capture_output=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  report:\n    cmd: cat model.txt > report.txt\n    deps: [model.txt]\n    outs: [report.txt]\n"
        "  train:\n    cmd: cat clean/a.txt > model.txt\n    deps: [clean]\n    outs: [model.txt]\n"
        "  clean:\n    cmd: mkdir -p clean && cp raw.txt clean/a.txt\n    deps: [raw.txt]\n    outs: [clean]\n"
    )
    with DvcSession(tmp_path) as dvc:
        assert dvc.stage_order() == ["clean", "train", "report"]
        assert dvc.stage_order("train") == ["clean", "train"], "a target and what it needs, as `dvc repro train`"
        assert dvc.stage_order("clean") == ["clean"]
        assert dvc.stage_order("nope") == [], "an unknown target: none (the run says so in one sentence)"
