"""The demo's wait on its deployment runs: each end said as it comes, more runs started on an end, a failure in one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.demo import runs as demo_runs
from flows.gateways.prefect_api import RunState


class ServerStates:
    """What the server says of each run, one poll after another (a run goes final after `polls` looks)."""

    def __init__(self, ends: dict[str, tuple[str, str, int]]) -> None:
        self.ends, self.looks = ends, {name: 0 for name in ends}

    def __call__(self, run_ids: list[str]) -> dict[str, RunState]:
        states = {}
        for run_id in run_ids:
            kind, name, polls = self.ends[run_id]
            self.looks[run_id] += 1
            done = self.looks[run_id] >= polls
            states[run_id] = RunState(kind if done else "RUNNING", name if done else "Running",
                                      "boom" if done and kind != "COMPLETED" else "", 12.0)
        return states


def demo(tmp_path: Path, monkeypatch, ends: dict[str, tuple[str, str, int]]) -> demo_runs.DemoRuns:
    monkeypatch.setattr(demo_runs.prefect_api, "run_states", ServerStates(ends))
    monkeypatch.setattr(demo_runs.DemoRuns, "POLL_S", 0.0)
    runs = demo_runs.DemoRuns(tmp_path, "http://127.0.0.1:1/api", 2, Settings())
    runs.names = {run_id: f"exp-{run_id}" for run_id in ends}
    return runs


def test_each_end_is_said_as_it_comes_and_may_start_more(tmp_path, monkeypatch, capsys):
    runs = demo(tmp_path, monkeypatch, {"a": ("COMPLETED", "Completed", 3), "b": ("COMPLETED", "Completed", 1),
                                        "c": ("COMPLETED", "Completed", 2)})
    started = []

    def on_end(run_id: str) -> list[str]:
        started.append(run_id)
        return ["c"] if run_id == "b" else []

    runs.wait(["a", "b"], on_end)
    assert started == ["b", "a", "c"], "b ends first and starts c, which is waited for too"
    assert capsys.readouterr().out.splitlines() == ["    exp-b: Completed (12 s)", "    exp-a: Completed (12 s)",
                                                   "    exp-c: Completed (12 s)"]


def test_a_run_that_did_not_complete_is_one_sentence_naming_it_and_its_log(tmp_path, monkeypatch):
    runs = demo(tmp_path, monkeypatch, {"a": ("COMPLETED", "Completed", 1), "f00d": ("CRASHED", "Crashed", 2)})
    with pytest.raises(TunedeckError) as caught:
        runs.wait(["a", "f00d"])
    said = str(caught.value)
    assert "exp-f00d ended Crashed (boom)" in said and "prefect flow-run logs f00d" in said
    assert str(tmp_path / demo_runs.LOG) in said


def test_a_worker_that_stopped_is_said_with_its_log(tmp_path, monkeypatch):
    class Gone:
        returncode = 2

        def poll(self) -> int:
            return 2

    runs = demo(tmp_path, monkeypatch, {"a": ("COMPLETED", "Completed", 9)})
    runs.worker = Gone()
    with pytest.raises(TunedeckError, match=r"the demo's worker stopped \(exit 2\) before its runs ended: .*demo-worker.log"):
        runs.wait(["a"])
