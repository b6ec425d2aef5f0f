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
