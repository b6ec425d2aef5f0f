"""Record the dashboard's fakes from real runs: `make record-fakes` writes tui/providers/recorded.json.

On a temporary copy of the project with tiny data it starts a real Prefect server, the
deployments and a worker with two stand-in GPUs on host "gpu-box-1", then makes the runs a
user makes: a plain `dvc repro` (a flow run per stage), a finished pipeline deployment run, an
experiment (the train deployment), and a pipeline run caught while it trains. What the
dashboard's providers read from that server (the runs as PrefectApi returns them, the worker's
host telemetry as RemoteHosts reads it, the experiment's log and summary) is written out; the
demo's fake Prefect builds its thousand runs from these shapes.

Two halves: capture() makes the runs and reads them, record() turns what was read into the
file's content. record() takes out what belongs to the machine and the moment, not to the runs:
times become seconds before the recording, the temporary folder becomes /home/me, durations and
ages are rounded to 0.1 s, tags are sorted. What the runs carried (ids, names, metrics, scores, log lines) stays
as it was, so two recordings differ there: the committed file is by definition what the last
`make record-fakes` wrote, and tui.providers.shapes.serialise() is its only writer.
tests/tui/test_fakes.py checks that the file is exactly serialise() of itself (no field added by
hand) and, with capture() on a real server, that every kind of run has a real run's shape.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.contracts import StageProgress  # noqa: E402
from flows.gateways import gpus  # noqa: E402
from flows.host import server  # noqa: E402
from tests.integration.project import FINAL, api, env, free_port, make_project, run, wait  # noqa: E402
from tui.providers.fleet import RemoteHosts  # noqa: E402
from tui.providers.models import RemoteHost, Run, RunDetail, RunQuery  # noqa: E402
from tui.providers.prefect_api import PrefectApi  # noqa: E402
from tui.providers.shapes import RECORDED, canonical, serialise  # noqa: E402

HOST = "gpu-box-1"
HOME = "/home/me"
HANG_GUARD_S = 400  # a hang guard: a 3-epoch deployment run took 12 s in a quiet recording, minutes on a 2-core box shared by four test runs


@dataclass(frozen=True)
class Capture:
    """What the dashboard's providers read from the real server, as read."""

    runs: tuple[Run, ...]
    hosts: tuple[RemoteHost, ...]
    detail: RunDetail
    now: float
    """time.time() when the runs were read: their times are written relative to it."""
    folder: str
    """The temporary folder the project lived in: written as a user's folder."""


def capture(folder: Path, epochs: int = 3) -> Capture:
    """Every kind of run on a real server in folder: a `dvc repro`, a pipeline run of `epochs` epochs beside an
    experiment of one fewer (at least one), then a pipeline run caught once it has published its epoch `epochs`
    (then cancelled)."""
    project = make_project(folder / "project")
    url = server.start(free_port(), root=project)
    worker = None
    try:
        run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
        run(project, "dvc", "repro", PREFECT_API_URL=url)  # a flow run per stage, as a plain `dvc repro` makes
        worker = subprocess.Popen(["tunedeck", "worker", "--pool", "local", "--gpus", "0,1", "--price-per-hour", "2.5"], cwd=project,
                                  env=env(PREFECT_API_URL=url, TUNEDECK_HOST=HOST, **gpus.stand_in_env(2, project.parent / "stand-in-gpus")),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        finished = start(url, "pipeline", overrides=[f"train.epochs={epochs}"], pull=False, push=False)
        experiment = start(url, "train", overrides=[f"train.epochs={max(1, epochs - 1)}", "train.lr=0.002"])
        for run_id in (finished, experiment):  # side by side, one on each GPU
            _completed(url, run_id)
        training = start(url, "pipeline", overrides=["train.epochs=500"], pull=False, push=False)
        _wait_for_epoch(url, training, epochs)
        snapshot = PrefectApi(url).snapshot(RunQuery())
        now = time.time()
        detail = PrefectApi(url).detail(experiment)  # the log and summary of a finished run
        hosts = RemoteHosts(lambda: url, local_host="the dashboard's host", every=0).hosts()
        api(url, f"flow_runs/{training}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
        wait(url, training)
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        server.stop(root=project)
    assert snapshot.connected, snapshot.error
    return Capture(snapshot.runs, hosts, detail, now, str(folder))


def start(url: str, deployment: str, **parameters: Any) -> str:
    """A flow run of the named deployment, with these parameters; its id."""
    found = next(d["id"] for d in api(url, "deployments/filter") if d["name"] == deployment)
    return api(url, f"deployments/{found}/create_flow_run", {"parameters": parameters})["id"]


def _completed(url: str, run_id: str) -> str:
    done = wait(url, run_id, HANG_GUARD_S)
    assert done["state_type"] == "COMPLETED", (done["name"], done["state"])
    return run_id


def _wait_for_epoch(url: str, run_id: str, epoch: int) -> None:
    """Until the run has published epoch `epoch` of its training on the server."""
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        found = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]
        assert found["state_type"] not in FINAL, ("the run ended before its epoch", epoch, found["state"])
        progress = StageProgress.from_labels(found["labels"])
        if progress is not None and progress.epoch >= epoch:
            return
        assert time.monotonic() < deadline, f"the run never reported epoch {epoch} in {HANG_GUARD_S} s"
        time.sleep(0.2)


def record(captured: Capture) -> dict[str, Any]:
    """The recording: what was captured, its times relative to the capture, the temporary folder as a user's."""
    runs = [asdict(_normalised(r, captured.now)) for r in captured.runs]
    hosts = [asdict(replace(h, age_s=round(h.age_s, 1))) for h in captured.hosts]
    raw = {"about": __doc__.splitlines()[0], "runs": runs, "hosts": hosts, "detail": asdict(captured.detail)}
    return canonical(_scrub(raw, captured.folder))


def _normalised(r: Run, now: float) -> Run:
    """The run with its times as seconds before now (the fakes place them on their own clock) and its tags sorted
    (a stage tags its run from a set, so their order changes from one recording to the next)."""
    progress = r.progress and replace(r.progress, updated=round(r.progress.updated - now, 1))
    return replace(r, start=None if r.start is None else round(r.start - now, 1), progress=progress,
                   duration_s=None if r.duration_s is None else round(r.duration_s, 1), tags=tuple(sorted(r.tags)))


def _scrub(value: Any, folder: str) -> Any:
    """value with the temporary folder, in every string, replaced by a user's folder."""
    if isinstance(value, str):
        return value.replace(folder, HOME)
    if isinstance(value, dict):
        return {k: _scrub(v, folder) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v, folder) for v in value]
    return value


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tunedeck-record-") as tmp:
        recording = record(capture(Path(tmp)))
    RECORDED.write_text(serialise(recording))
    print(f"recorded {len(recording['runs'])} runs and {len(recording['hosts'])} host(s) into {RECORDED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
