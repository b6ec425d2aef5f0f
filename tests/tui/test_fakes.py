"""The demo's fakes have the shapes of real runs: each fake run fits the run recorded from a real server
that it was built on (tui/providers/recorded.json, written by `make record-fakes`).

A real-run test (tests/integration/test_deployments.py) holds fresh real runs to the same recording,
so a change in what real runs carry fails there until the recording, and with it the fakes, follows.
"""

from __future__ import annotations

from tui.providers.fake_prefect import fake_runs
from tui.providers.models import FINAL_STATES
from tui.providers.shapes import fits, kind, recorded, shape, templates


def test_the_recording_holds_every_kind_of_run_a_user_makes():
    assert set(templates()) == {"pipeline:running", "pipeline:final", "experiment:final", "prepare:final",
                                "train:final", "evaluate:final"}
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
