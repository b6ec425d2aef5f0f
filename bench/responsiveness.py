"""How soon tunedeck answers when something goes wrong (medians over rounds, on a temporary copy).

These were wall-clock limits inside tests; a limit in a test fails on a slow or busy machine,
so the tests now wait on the event and this bench measures how soon it comes:

  crashed     a train stage killed with kill -9 -> its flow run reads CRASHED     goal <= 15 s
  cancelled   a cancel set through the API -> the stage process has exited        goal <= 10 s
  no server   `tunedeck deploy` against a port where nothing answers -> its error  goal <= 15 s
  no weights  model.pretrained: true, offline, empty Hugging Face cache -> error   goal <= 5 s
  stale       SIGTERM to a worker -> a dashboard's fleet view shows its host stale  goal <= 10 s  (test_remote)
  warm kill   kill -9 of a warm stage's stand-in -> its forked child has exited     goal <= 15 s  (test_warm_stages)
  warm term   SIGTERM to a warm stage's stand-in -> it exits with its child's status goal <= 30 s
  warm 137    the forked child killed outright -> its stand-in exits 137            goal <= 15 s
  zombie      a host dies whole (worker and run, SIGKILL) -> its run reads CRASHED  goal <= 240 s (test_resume_remote;
              --zombie: a round takes about TUNEDECK_ZOMBIE_AFTER_S, 180 s by default)

Each goal is the limit a test used to assert; the tests now wait on the event under a hang guard of
at least 5x these medians. Not measured here: a multi-node rank killed -> both runs end (two network
namespaces: tests/integration/test_multinode.py prints it), and a PostgreSQL server's runs
(tests/integration/test_postgres.py).
Usage: python bench/responsiveness.py [--rounds 3] [--zombie]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.contracts.settings import Settings  # noqa: E402
from flows.gateways import gpus  # noqa: E402
from flows.host import server  # noqa: E402
from flows.stages.warm import WarmStages  # noqa: E402
from tests.integration.project import api, env, free_port, make_project, run  # noqa: E402
from tests.integration.test_deployments import start  # noqa: E402
from tests.integration.test_pipeline import long_train_stage, train_runs  # noqa: E402
from tests.integration.test_resume_remote import kill_tree  # noqa: E402
from tests.integration.test_warm_stages import long_train, wait_for_child, wait_for_training  # noqa: E402
from tui.providers.fleet import RemoteHosts  # noqa: E402

GOALS = {"crashed": 15.0, "cancelled": 10.0, "no server": 15.0, "no weights": 5.0, "stale": 10.0,
         "warm kill": 15.0, "warm term": 30.0, "warm 137": 15.0, "zombie": 240.0}
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


def worker(project: Path, url: str, host: str, **extra: str) -> subprocess.Popen:
    """`tunedeck worker` in a session of its own (so the whole of it can be stopped), as host."""
    return subprocess.Popen(["tunedeck", "worker", "--pool", "local"], cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env(PREFECT_API_URL=url, TUNEDECK_HOST=host, **extra))


def host_shown(fleet: RemoteHosts, host: str, stale: bool) -> bool:
    """Whether the fleet view (as the dashboard polls it) shows host, stale or not as asked."""
    return any(h.host.hostname == host and h.stale is stale for h in fleet.hosts())


def stale(project: Path, url: str, host: str) -> float:
    """A worker publishing telemetry is stopped with SIGTERM: seconds until its host reads stale."""
    proc = worker(project, url, host, **gpus.stand_in_env(1, project.parent / "stand-in-gpus"))
    fleet = RemoteHosts(lambda: url, local_host="this-bench")  # polled every 2 s, as the dashboard's is
    try:
        until(lambda: host_shown(fleet, host, stale=False))
        os.killpg(proc.pid, signal.SIGTERM)
        return until(lambda: host_shown(fleet, host, stale=True))
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL a worker's session if it is still there, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def long_epochs(project: Path):
    """params.yaml with 5,000 epochs (a train stage that runs until stopped), put back after."""
    params = (project / "params.yaml").read_text()
    raw = yaml.safe_load(params)
    raw["train"]["epochs"] = 5000
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        yield
    finally:
        (project / "params.yaml").write_text(params)


def ended(proc: psutil.Process) -> bool:
    """Whether a process (another's child, reaped by its parent) has exited."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def warm_cases(project: Path) -> dict[str, float]:
    """A warm server's three ways for a stage to end: seconds from the signal to the event."""
    found = {}
    with long_epochs(project), tempfile.TemporaryDirectory() as tmp:
        warm = WarmStages().start()
        try:
            until(lambda: warm.path.exists())
            proc = long_train(project, warm, Path(tmp) / "kill")
            child = wait_for_child(warm, proc)
            wait_for_training(Path(tmp) / "kill", proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            found["warm kill"] = until(lambda: ended(child))
            proc = long_train(project, warm, Path(tmp) / "term")
            wait_for_child(warm, proc)
            wait_for_training(Path(tmp) / "term", proc)
            proc.terminate()
            found["warm term"] = until(lambda: proc.poll() is not None)
            proc = long_train(project, warm, Path(tmp) / "137")
            wait_for_child(warm, proc).kill()
            found["warm 137"] = until(lambda: proc.poll() is not None)
        finally:
            warm.stop()
    return found


def zombie(project: Path, url: str, host: str) -> float:
    """A host that dies whole right after its run's first heartbeat: seconds from the SIGKILL until the run reads
    CRASHED (the longest wait: the whole threshold, plus how soon the server's detection looks)."""
    proc = worker(project, url, host)
    try:
        run_id = start(url, "pipeline", overrides=["train.epochs=5000"], pull=False, push=False)
        until(lambda: heartbeats(url, run_id), poll=0.5)  # detection starts at a heartbeat: none, none to miss
        kill_tree(proc.pid)
        return until(lambda: state(url, run_id) == "CRASHED", poll=0.5, timeout=5 * Settings.read().zombie_after_s)
    finally:
        stop(proc)


def heartbeats(url: str, run_id: str) -> int:
    """How many heartbeats a flow run has sent (the events API)."""
    found = api(url, "events/filter", {"filter": {"event": {"name": ["prefect.flow-run.heartbeat"]},
                                                  "resource": {"id": [f"prefect.flow-run.{run_id}"]}}, "limit": 50})
    return len(found["events"])


def one_round(project: Path, url: str, i: int, with_zombie: bool) -> dict[str, float]:
    """Every latency once (the zombie only when asked: a round of it takes TUNEDECK_ZOMBIE_AFTER_S)."""
    found = {"crashed": crashed(project, url), "cancelled": cancelled(project, url), "no server": no_server(project),
             "no weights": no_weights(project), "stale": stale(project, url, f"bench-stale-{i}"), **warm_cases(project)}
    if with_zombie:
        found["zombie"] = zombie(project, url, f"bench-dead-{i}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zombie", action="store_true", help="also time the dead host's run (a round: ~180 s)")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        project = make_project(Path(tmp))
        run(project, "dvc", "repro", "prepare", TUNEDECK_PREFECT="off")
        url = server.start(free_port(), root=project)
        try:
            run(project, "tunedeck", "deploy", PREFECT_API_URL=url)  # the pool and the zombie detection
            for i in range(args.rounds):
                for name, value in one_round(project, url, i, args.zombie).items():
                    seconds.setdefault(name, []).append(value)
                print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()), flush=True)
        finally:
            server.stop(root=project)
    print(f"\nmedians over {args.rounds} rounds (goal; a test's hang guard is at least 5x the median):")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"  {name:<11} {median:6.2f} s  (<= {GOALS[name]:g} s: {'ok' if median <= GOALS[name] else 'MISSED'}; "
              f"{median / GOALS[name]:.2f} of the goal)")
    if "zombie" in seconds:
        print(f"  (zombie: TUNEDECK_ZOMBIE_AFTER_S is {Settings.read().zombie_after_s} s)")


if __name__ == "__main__":
    main()
