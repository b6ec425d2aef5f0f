"""How soon tunedeck answers when something goes wrong (medians over rounds, on a temporary copy).

These were wall-clock limits inside tests; a limit in a test fails on a slow or busy machine,
so the tests now wait on the event and this bench measures how soon it comes:

  crashed     a train stage killed with kill -9 -> its flow run reads CRASHED     goal <= 15 s
  cancelled   a cancel set through the API -> the stage process has exited        goal <= 10 s
  no server   `tunedeck deploy` against a port where nothing answers -> its error  goal <= 15 s
  no weights  model.pretrained: true, offline, empty Hugging Face cache -> error   goal <= 5 s
Usage: python bench/responsiveness.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import server  # noqa: E402
from tests.integration.project import api, free_port, make_project, run  # noqa: E402
from tests.integration.test_pipeline import long_train_stage, train_runs  # noqa: E402

GOALS = {"crashed": 15.0, "cancelled": 10.0, "no server": 15.0, "no weights": 5.0}
NO_WEIGHTS = """
import time, huggingface_hub.constants as hc
from flows.core.errors import TunedeckError
from flows.core.model import build_model
from flows.core.params import ModelParams
import timm  # imports out of the measured time: what is measured is the lookup that fails
tic = time.perf_counter()
try:
    build_model(ModelParams(name="test_resnet", pretrained=True), 3)
except TunedeckError:
    print(time.perf_counter() - tic)
"""


def until(predicate, poll: float = 0.05, timeout: float = 300) -> float:
    """Seconds until predicate() holds (polled), or a TimeoutError."""
    tic = time.monotonic()
    while not predicate():
        if time.monotonic() - tic > timeout:
            raise TimeoutError("the event never came")
        time.sleep(poll)
    return time.monotonic() - tic


def state(url: str, run_id: str) -> str:
    """A flow run's state type, from the API."""
    return api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]["state_type"]


def crashed(project: Path, url: str) -> float:
    with long_train_stage(project) as proc:
        run_id = train_runs(url)[0]["id"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return until(lambda: state(url, run_id) == "CRASHED")


def cancelled(project: Path, url: str) -> float:
    with long_train_stage(project) as proc:
        run_id = train_runs(url)[0]["id"]
        api(url, f"flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
        return until(lambda: proc.poll() is not None)


def no_server(project: Path) -> float:
    tic = time.monotonic()
    run(project, "tunedeck", "deploy", check=False, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    return time.monotonic() - tic


def no_weights(project: Path) -> float:
    with tempfile.TemporaryDirectory() as empty:
        out = run(project, sys.executable, "-c", NO_WEIGHTS, HF_HUB_CACHE=empty, HF_HOME=empty, HF_HUB_OFFLINE="1")
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    seconds: dict[str, list[float]] = {name: [] for name in GOALS}
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp))
        run(project, "dvc", "repro", "prepare", TUNEDECK_PREFECT="off")
        url = server.start(free_port(), root=project)
        try:
            for i in range(rounds):
                seconds["crashed"].append(crashed(project, url))
                seconds["cancelled"].append(cancelled(project, url))
                seconds["no server"].append(no_server(project))
                seconds["no weights"].append(no_weights(project))
                print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()), flush=True)
        finally:
            server.stop(root=project)
    print(f"\nmedians over {rounds} rounds (goal):")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:<11} {median:6.2f} s  (<= {GOALS[name]:g} s: {'ok' if median <= GOALS[name] else 'MISSED'})")


if __name__ == "__main__":
    main()
