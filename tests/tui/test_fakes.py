"""The demo's fakes have the shapes of real runs: each fake run fits the run recorded from a real server
that it was built on (tui/providers/recorded.json, written by `make record-fakes`).

The recording itself is held to reality twice: it is exactly what the recorder writes (no field added
by hand), and a fresh capture on a real server, made by the recorder's own code, has every kind of run
it holds in the same shape. A change in what real runs carry fails here until the recording, and with
it the fakes, follows (`make record-fakes`).
"""

from __future__ import annotations

import json

import pytest

from bench.record_fakes import capture, record
from tui.providers.fake_prefect import fake_runs
from tui.providers.models import FINAL_STATES, Run
from tui.providers.shapes import RECORDED, fits, kind, recorded, serialise, shape, templates


def test_the_recording_is_exactly_what_the_recorder_writes():
    """recorded.json is serialise() of itself: the providers' dataclasses, their keys in order, nothing added.
    A field the dashboard needs comes from the recorder (bench/record_fakes.py), never from an edit of the file."""
    text = RECORDED.read_text()
    assert _written_by_the_recorder(text), "recorded.json was edited by hand: run `make record-fakes` instead"
    added, dropped = json.loads(text), json.loads(text)
    added["runs"][0]["notes"] = "added by hand"
    del dropped["runs"][0]["scores"]
    for edited in (added, dropped):  # the check itself: an edit in the file's own format is caught
        assert not _written_by_the_recorder(json.dumps(edited, indent=1) + "\n")


def _written_by_the_recorder(text: str) -> bool:
    return serialise(json.loads(text)) == text


def test_the_recording_holds_every_kind_of_run_a_user_makes():
    assert set(templates()) == {"pipeline:running", "pipeline:final", "experiment:final", "prepare:final",
                                "train:final", "evaluate:final", "export:final"}
    running = templates()["pipeline:running"]
    assert running.stage == "train" and running.progress is not None and running.host and running.gpus
    assert {"val/acc", "train/loss"} <= {k for k, _ in running.progress.metrics}
    assert recorded()["hosts"], "a worker's host telemetry, as the dashboard read it"


def test_every_fake_run_has_the_shape_of_a_recorded_real_one():
    runs = fake_runs(1000)
    assert {kind(r) for r in runs} <= set(templates()) | {"pipeline:running"}
    for run in runs:
        template = templates()[kind(run)]
        assert fits(run, template), (run.id, run.state, shape(run), shape(template))
    assert sum(r.state == "RUNNING" for r in runs) == 4 and all(r.state in FINAL_STATES for r in runs[6:])


def test_a_fleet_of_64_gpus_and_10000_runs_is_made_a_page_at_a_time():
    """The bench's scale (bench/dash_bench.py): a page of runs is made when asked for, only a few pages are kept, and
    every busy GPU of the 8 hosts names a running run of the fake server."""
    from tui.providers import demo_providers
    from tui.providers.fake_runs import KEEP
    from tui.providers.models import RunQuery

    providers = demo_providers(10_000, animate=False, hosts=8)
    prefect = providers.orchestrator
    snap = prefect.snapshot(RunQuery(offset=9_900, limit=100))
    assert snap.total_runs == 10_000 and [r.id for r in snap.runs][-1] == "run-9999" and len(snap.runs) == 100
    prefect.snapshot(RunQuery(offset=0, limit=100))
    assert not prefect.runs.added and not prefect.runs.changed and len(prefect.runs._made) <= KEEP, \
        "the fake keeps a few pages it made, never all 10,000"
    assert all(fits(r, templates()[kind(r)]) for r in snap.runs)
    telemetry = providers.telemetry.sample()
    assert len(telemetry.gpus) + sum(len(h.gpus) for h in telemetry.remote) == 64 and len(telemetry.remote) == 7
    running = {r.id for r in snap.running}
    on_gpus = {p.flow_run_id for g in (*telemetry.gpus, *(g for h in telemetry.remote for g in h.gpus)) for p in g.processes}
    assert len(running) == 48 and on_gpus == running


@pytest.mark.slow
def test_every_recorded_kind_has_the_shape_of_a_fresh_real_run(tmp_path):
    """The recorder's own capture, shrunk to one epoch, on a real server: the same kinds of runs as recorded.json
    (each stage of a `dvc repro`, a finished and a training pipeline run, an experiment), each in the recorded shape:
    flow, deployment, tag kinds, stage, host, GPUs, progress metric names, score names. The recorded hosts and the
    run detail are held to the fresh ones too."""
    captured = capture(tmp_path, epochs=1)
    fresh: dict[str, Run] = {}
    for run in captured.runs:
        fresh.setdefault(kind(run), run)
    assert {k: shape(r) for k, r in fresh.items()} == {k: shape(t) for k, t in templates().items()}
    again = record(captured)
    assert serialise(again) == serialise(json.loads(serialise(again))), "what the recorder writes reads back the same"
    assert [_host(h) for h in again["hosts"]] == [_host(h) for h in recorded()["hosts"]]
    assert bool(again["detail"]["logs"]) and bool(again["detail"]["artifacts"]) and recorded()["detail"]["artifacts"]


def _host(host: dict) -> tuple:
    """What the fleet panel relies on in a recorded host: its name, worker, GPU count and which metrics it has."""
    gpus = [sorted(k for k, v in g.items() if v is not None) for g in host["gpus"]]
    return host["host"]["hostname"], host["worker"], host["stale"], host["no_gpu"], gpus, sorted(host["host"])
