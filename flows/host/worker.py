"""`tunedeck worker`: a Prefect process worker on this host, and a stop that leaves nothing behind.

Beside it, this host's GPU, CPU and RAM telemetry goes to the Prefect server every few seconds
(flows.host.telemetry), so a dashboard on any host shows this host's GPUs and the runs on them.

SIGTERM (what a supervisor sends) or Ctrl-C to `tunedeck worker` stops the whole family: the
runs it had started get SIGTERM first (a stage ends as stopped, its flow run Crashed), then
the Prefect worker; whatever is left after a grace period is killed. A run whose flow run is
still open after that is marked Crashed through the API, so no run stays Running with nobody
behind it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import psutil

from flows.contracts.settings import Settings
from flows.gateways import processes
from flows.host.deploy import worker_command
from flows.run.slot_lease import release_dead

GRACE_SECONDS = 8.0  # the runs' and the worker's time to end on SIGTERM, then SIGKILL (the goal is a clean host in 10 s)


def run_worker(settings: Settings, pool: str, gpus: str | None, git_pull: bool = False, cpu_slots: int = 1) -> int:
    """Start a Prefect process worker on this host that runs one flow run per GPU (or cpu_slots on the CPU)."""
    cmd, env, runs = worker_command(settings, pool, gpus, git_pull, cpu_slots=cpu_slots)
    code = f"{runs.project}" + (" (git pull before each run)" if git_pull else "")
    where = f"GPUs {runs.gpus}" if gpus else "the CPU" + (f" ({cpu_slots} runs at once)" if cpu_slots > 1 else "")
    print(f"worker for pool '{pool}' on {where}, code in {code}: {' '.join(cmd[1:])}", flush=True)
    # not tied: this process stops it on SIGTERM/SIGINT (its runs first, stop_family); a kill -9 of this one leaves it
    # serving its runs, their ends reported, as a Prefect worker started by hand would
    proc = processes.spawn(cmd, tie=False, env=env)
    publisher = start_publisher(pool, env, runs)
    Reconciler(proc.pid, runs.project).start()

    def stop(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if publisher is not None:  # first: dashboards show this host offline now, not after the runs' grace period
            publisher.stop()
        stopped = stop_family(proc.pid, runs.project)
        print(f"tunedeck worker: stopped by {signal.Signals(signum).name}: the Prefect worker and "
              f"{len(stopped)} run(s) it had started" + (f" ({', '.join(stopped)}: marked Crashed)" if stopped else ""),
              file=sys.stderr, flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = proc.wait()
    if publisher is not None:
        publisher.stop()
    return code


def start_publisher(pool: str, env: dict[str, str], runs: Settings):
    """This host's telemetry, published through the Prefect server while the worker runs (flows.host.telemetry)."""
    from flows.gateways.prefect_api import api_url
    from flows.host.telemetry import HostPublisher

    url = env.get("PREFECT_API_URL") or api_url()
    if not url:
        return None
    return HostPublisher(url, worker=pool, project=runs.project or Path("."), host_name=runs.host).start()


def flow_run_of(process: psutil.Process) -> str | None:
    """The flow run a process belongs to (the worker starts each run with PREFECT__FLOW_RUN_ID)."""
    with contextlib.suppress(psutil.Error):
        return process.environ().get("PREFECT__FLOW_RUN_ID")
    return None


def stop_family(worker_pid: int, root: Path | None = None, grace: float = GRACE_SECONDS) -> list[str]:
    """SIGTERM the worker's runs and then the worker, SIGKILL what outlives the grace; the runs' ids.

    The runs go first: the Prefect worker, told to stop, would no longer report their end.
    """
    try:
        worker = psutil.Process(worker_pid)
        family = worker.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    runs = sorted({run for run in map(flow_run_of, family) if run})
    dump_stacks(family)
    alive = processes.stop_all(family, grace / 2, kill=False)
    processes.stop_all([worker, *alive], grace / 2)
    mark_crashed(runs)
    if root is not None:
        for run in runs:
            free_slots(root, run)
    return runs


def dump_stacks(family: list[psutil.Process]) -> None:
    """Each run's own process (not its stages) writes its threads' stacks to the worker's log before it is stopped
    (flows.host.steps arms SIGUSR1 for it): a run that hung says where."""
    roots = [p for p in family if flow_run_of(p) and not _parent_is_run(p)]
    for process in roots:
        with contextlib.suppress(psutil.Error):
            print(f"tunedeck worker: the threads of flow run {flow_run_of(process)} (pid {process.pid}) as it is stopped:",
                  file=sys.stderr, flush=True)
            process.send_signal(signal.SIGUSR1)
    if roots:
        time.sleep(0.5)  # the dump is a few lines written by the process itself


def _parent_is_run(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        parent = process.parent()
        return parent is not None and flow_run_of(parent) is not None
    return False


STOPPED = "its worker was stopped (tunedeck worker got a stop signal); run it again to resume"
GONE = ("its process ended while its end could not be recorded (the Prefect server was unreachable); "
        "run it again to resume from its checkpoint")


def mark_crashed(run_ids: list[str]) -> None:
    """At the worker's stop: its runs that are not final yet are Crashed; a server that is down is said."""
    missed = sorted(set(run_ids) - set(crash_unfinished(run_ids, STOPPED)))
    if missed:
        print(f"tunedeck worker: could not mark runs {', '.join(missed)} Crashed (the server does not answer); "
              "they show Running until its zombie detection marks them.", file=sys.stderr, flush=True)


class Reconciler:
    """Marks Crashed a run this worker started whose process is gone while the server still says it runs.

    Normally a run ends its own flow run, or the Prefect worker marks it Crashed when its process
    fails. Neither can when the server is down at that moment (an outage, a restart): the run
    would show Running forever. Every POLL_S this looks at the runs below the Prefect worker;
    GRACE_S after one's process has gone, a run that is still not final on the server is marked
    Crashed, retried until the server answers again.
    """

    POLL_S = 2.0
    GRACE_S = 5.0  # the Prefect worker's own report comes first when the server is up

    def __init__(self, worker_pid: int, root: Path | None = None) -> None:
        self.worker_pid, self.root = worker_pid, root
        self.alive: set[str] = set()
        self.gone: dict[str, float] = {}  # run id -> when its process was last seen

    def start(self) -> Reconciler:
        threading.Thread(target=self._loop, name="tunedeck-reconcile", daemon=True).start()
        return self

    def _loop(self) -> None:
        while True:
            time.sleep(self.POLL_S)
            with contextlib.suppress(Exception):  # never let bookkeeping stop the worker
                self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        """One look: which runs are still here, and which that went are not final on the server."""
        try:
            family = psutil.Process(self.worker_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        current = {run for run in map(flow_run_of, family) if run}
        for run in self.alive - current:
            self.gone.setdefault(run, now)
        self.alive = current
        due = [run for run, since in self.gone.items() if now - since >= self.GRACE_S and run not in current]
        if due and self.root is not None:  # every process of these runs has ended: their GPUs are free now
            for run in due:
                free_slots(self.root, run)
        if due:
            for run in crash_unfinished(due, GONE):
                self.gone.pop(run, None)


def free_slots(root: Path, run_id: str) -> None:
    """The slots a dead run of this clone held, freed now (not when their leases run out); said in the log."""
    for slot in release_dead(root, run_id):
        print(f"tunedeck worker: flow run {run_id} has no process left; its slot {slot} is free again",
              file=sys.stderr, flush=True)


def crash_unfinished(run_ids: list[str], why: str) -> list[str]:
    """Mark those of run_ids that are not final Crashed (their processes are gone); the ids settled.

    A server that does not answer at once settles none (not the client's minute of retries).
    """
    if not run_ids:
        return []
    from prefect.states import Crashed

    from flows.gateways.prefect_api import api_url, end_run, healthy

    url = api_url()
    if not url or not healthy(url, timeout=1.0):
        return []
    settled = []
    try:
        for run_id in run_ids:
            if end_run(run_id, Crashed(message=why)):
                print(f"tunedeck worker: flow run {run_id} had no process left; marked Crashed", file=sys.stderr,
                      flush=True)
            settled.append(run_id)
    except Exception:  # noqa: BLE001 - the server went away meanwhile: the rest next time
        pass
    return settled
