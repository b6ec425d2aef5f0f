"""Record the dashboard's fakes from real runs: `make record-fakes` writes tui/providers/recorded.json.

On a temporary copy of the project with tiny data it starts a real Prefect server, the
deployments and a worker with two stand-in GPUs on host "gpu-box-1", then makes the runs a
user makes: a plain `dvc repro` (a flow run per stage), a finished pipeline deployment run, and
a pipeline run caught while it trains. What the dashboard's providers read from that server
(the runs as PrefectApi returns them, the worker's host telemetry as RemoteHosts reads it) is
written out; the demo's fake Prefect builds its thousand runs from these shapes, and
tests/tui/test_fakes.py plus a real-run test keep fakes and reality in step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import server  # noqa: E402
from flows.contracts import StageProgress  # noqa: E402
from tests.integration.project import api, env, free_port, make_project, run  # noqa: E402
from tests.integration.test_deployments import start, wait  # noqa: E402
from tui.providers.fleet import RemoteHosts  # noqa: E402
from tui.providers.models import RunQuery  # noqa: E402
from tui.providers.prefect_api import PrefectApi  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tui" / "providers" / "recorded.json"
HOST = "gpu-box-1"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tunedeck-record-") as tmp:
        project = make_project(Path(tmp) / "project")
        url = server.start(free_port(), root=project)
        worker = None
        try:
            run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
            run(project, "dvc", "repro", PREFECT_API_URL=url)  # a flow run per stage, as a plain `dvc repro` makes
            worker = subprocess.Popen(["tunedeck", "worker", "--pool", "local", "--gpus", "0,1"], cwd=project,
                                      env=env(PREFECT_API_URL=url, TUNEDECK_FAKE_GPUS="2", TUNEDECK_HOST=HOST),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            done = wait(url, start(url, "pipeline", overrides=["train.epochs=3"], pull=False, push=False), timeout=400)
            assert done["state_type"] == "COMPLETED", done["state"]
            done = wait(url, start(url, "train", overrides=["train.epochs=2", "train.lr=0.002"]), timeout=400)  # an experiment
            assert done["state_type"] == "COMPLETED", done["state"]
            training = start(url, "pipeline", overrides=["train.epochs=500"], pull=False, push=False)
            deadline = time.monotonic() + 300
            while True:
                assert time.monotonic() < deadline, "the run never reported its third epoch"
                found = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [training]}}})[0]
                progress = StageProgress.from_labels(found["labels"])
                if progress is not None and progress.epoch >= 3:
                    break
                time.sleep(0.2)
            snapshot = PrefectApi(url).snapshot(RunQuery())
            detail = PrefectApi(url).detail(done["id"])  # the log and summary of a finished run
            hosts = RemoteHosts(lambda: url, local_host="the dashboard's host", every=0).hosts()
            api(url, f"flow_runs/{training}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
            wait(url, training, timeout=60)
        finally:
            if worker is not None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(timeout=30)
            server.stop(root=project)
    runs = [asdict(r) for r in snapshot.runs]
    for r in runs:  # times relative to the recording; the fakes place them on their own clock
        r["start"] = None if r["start"] is None else round(r["start"] - time.time(), 1)
    logs = [line.replace(tmp, "/home/me") for line in detail.logs]  # the temporary copy, as a user folder
    record = {"about": __doc__.splitlines()[0], "runs": runs, "hosts": [asdict(h) for h in hosts],
              "detail": {"logs": logs, "artifacts": [a.replace(tmp, "/home/me") for a in detail.artifacts]}}
    OUT.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"recorded {len(runs)} runs and {len(hosts)} host(s) into {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
