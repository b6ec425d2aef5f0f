"""One training run over several hosts: the pipeline run places the other nodes as flow runs of their own.

With `base.nodes: N` (N > 1) a pipeline run, when it reaches the train stage, starts N-1 runs of
the `ddp-node` deployment (`run_deployment`, same work pool). Each is picked up by a worker with
a free slot (a worker runs one run per GPU, so a busy host leaves them to the others), works in
its own workspace at the leader's commit with the leader's overrides, holds its own GPU slot,
pulls and prepares the data, checks that its data version is the leader's, and starts torchrun
as node k. The leader's train stage is node 0: torchrun's static rendezvous serves the c10d store
on it, so global rank 0 (the only one that writes the model, checkpoints and metrics) is the
leader's, in the run's workspace, and evaluate, export and the promotion gate follow as usual.

Failure: a rank that dies closes its sockets; gloo/NCCL raise on every other rank at the next
collective, each host's torchrun exits non-zero, so the leader's stage and every node's flow run
fail; a rank whose torchrun dies gets SIGTERM (flows.stages.train.die_with_agent). The leader
cancels node runs still open when its stage ends (cancelling kills their processes), and every
flow run's slot goes with it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from prefect import flow, get_run_logger

from flows.contracts.placement import Placement
from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.gateways import processes
from flows.gateways.dvc.cli import sync
from flows.gateways.git import git
from flows.gateways.prefect_api import end_run, run_states
from flows.run.labels import flush_labels
from flows.run.session import dvc_session, open_session
from flows.run.slot import device_slot
from flows.run.workspace import run_workspace
from flows.stages.warm import OFF

NODE_DEPLOYMENT = "ddp-node/ddp-node"


def address_towards(host: str, port: int, settings: Settings) -> str:
    """This host's address on the route to host:port (what the other nodes can reach it by); the node_addr setting
    overrides."""
    if settings.node_addr:
        return settings.node_addr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # no packet is sent: the kernel picks the route
        s.connect((host, port))
        return s.getsockname()[0]


def server_endpoint() -> tuple[str, int]:
    """The Prefect server's host and port, as this run reaches it."""
    from prefect.settings import PREFECT_API_URL

    url = urlparse(PREFECT_API_URL.value() or "http://127.0.0.1:4200/api")
    return url.hostname or "127.0.0.1", url.port or (443 if url.scheme == "https" else 80)


EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def free_port(address: str, tries: int = 200) -> int:
    """A port on address for node 0's rendezvous, free now and outside the kernel's ephemeral range.

    torchrun listens on it seconds after it is picked (the other nodes' runs are placed first), and
    a port from the ephemeral range (what binding port 0 gives) can meanwhile become the local end of
    any outgoing connection on the host (this host's Prefect clients make many): torchrun then failed
    with EADDRINUSE (seen in CI). Ports below the range are never handed out that way; one is picked at
    random among them and checked free.
    """
    import random

    try:
        low = int(EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default range starts here
    candidates = range(max(1024, low - 10_000), low)
    for port in random.Random().sample(candidates, min(tries, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # all taken: the ephemeral range after all
        s.bind((address, 0))
        return s.getsockname()[1]


def commit_of(path: Path) -> str:
    return git("rev-parse", "HEAD", cwd=path).strip()


def train_across_nodes(ws: Path, overrides: list[str], nodes: int, settings: Settings,
                       train: Callable[[dict[str, object]], object]) -> None:
    """The train stage as node 0 of `nodes` (train(placement's settings) runs it), the other nodes placed as ddp-node
    flow runs; they end with it.
    """
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    from flows.core.paths import PREPARED
    from flows.core.prepare import load_manifest

    logger = get_run_logger()
    address = address_towards(*server_endpoint(), settings)
    placement = Placement(nodes, 0, f"{address}:{free_port(address)}")
    data_version = load_manifest(ws / PREPARED).data_version
    others = []
    for rank in range(1, nodes):
        run = run_deployment(NODE_DEPLOYMENT, timeout=0, parameters={
            "overrides": overrides, "node_rank": rank, "nodes": nodes, "master": placement.master,
            "commit": commit_of(ws), "data_version": data_version, "leader_run": str(flow_run.id or ""),
        })
        others.append(run.id)
    logger.info(f"train over {nodes} hosts: rendezvous on {placement.master}; node runs {', '.join(map(str, others))}")
    ended = []

    def node_ended(run_id: str, state: str) -> None:  # a node's ranks are gone: ours would wait on them
        if state in ("COMPLETED",):
            return
        ended.append(f"node run {run_id} ended {state}")
        stop_processes(Settings(**placement.settings()).env())

    watch = Watch(others, node_ended).start()
    ok = False
    try:
        train(placement.settings())
        ok = True
    except Exception:
        if ended:
            raise TunedeckError(f"training over {nodes} hosts stopped: {ended[0]}; see that run's log.") from None
        raise
    finally:
        watch.stop()
        end_nodes(others, logger, grace=30.0 if ok else 0.0)


class Watch:
    """Polls flow runs' states from a thread; on_end(run_id, state) once for each that reaches a final state."""

    def __init__(self, run_ids: list, on_end: Callable[[str, str], None], poll: float = 2.0) -> None:
        import threading

        self.run_ids, self.on_end, self.poll = [str(i) for i in run_ids], on_end, poll
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tunedeck-node-watch", daemon=True)

    def start(self) -> Watch:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.done.set()

    def _run(self) -> None:
        pending = [str(run_id) for run_id in self.run_ids]
        while pending and not self.done.wait(self.poll):
            try:
                states = run_states(pending)
            except Exception:  # noqa: BLE001 - a server hiccup: ask again next time
                continue
            for run_id, state in states.items():
                if state.final or state.kind == "CANCELLING":
                    pending.remove(run_id)
                    if not self.done.is_set():
                        self.on_end(run_id, state.kind)


def stop_processes(placement_env: dict[str, str]) -> list[int]:
    """SIGTERM this host's processes of one placement (its stage, torchrun and ranks carry its variables)."""
    import psutil

    stopped = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if all(env.get(k) == v for k, v in placement_env.items()):
                proc.terminate()
                stopped.append(proc.pid)
        except psutil.Error:
            continue
    return stopped


def end_nodes(run_ids: list, logger, grace: float = 30.0) -> None:
    """Wait up to grace for the node runs to end on their own; cancel the ones still open (their processes go)."""
    from prefect.states import Cancelling

    deadline = time.monotonic() + grace
    pending = [str(run_id) for run_id in run_ids]
    while pending and time.monotonic() < deadline:
        pending = [i for i, state in run_states(pending).items() if not state.final]
        if pending:
            time.sleep(1)
    for run_id in pending:
        logger.warning(f"node run {run_id} still open after the train stage ended: cancelling it")
        end_run(run_id, Cancelling(), if_open=False)


@flow(name="ddp-node", log_prints=True)
def ddp_node(overrides: list[str], node_rank: int, nodes: int, master: str, commit: str, data_version: str,
             leader_run: str = "") -> dict:
    """Node `node_rank` of a training run over `nodes` hosts: this host's share of the DDP processes.

    Started by the pipeline run that is node 0 (flows.run.multinode), never by hand.
    """
    from flows.core.paths import PREPARED
    from flows.core.prepare import load_manifest

    logger = get_run_logger()
    settings = Settings.read()  # this flow is its run's process's work
    clone = Path.cwd()
    if commit_of(clone) != commit:
        raise TunedeckError(
            f"this host's clone ({clone}) is at {commit_of(clone)[:12]}, the run's node 0 at {commit[:12]}: "
            "start its worker with --git-pull, or check out the same commit."
        )
    with open_session(clone) as session, run_workspace(clone, overrides) as ws, device_slot(settings) as env:
        session.workdir = ws
        sync("pull", "--allow-missing", cwd=ws, on_line=logger.info)
        for stage in dvc_session().stage_order():
            if stage == "train":
                break
            dvc_session().repro(stage, {**env, **settings.but(prefect="off", warm=OFF).env()}, on_line=logger.info)
        mine = load_manifest(ws / PREPARED).data_version
        if mine != data_version:
            raise TunedeckError(
                f"this host prepared data version {mine[:12]}, node 0 trains on {data_version[:12]}: "
                "every node must read the same data (dvc push it from node 0's clone, or fix data.source here)."
            )
        host, port = master.rsplit(":", 1)
        placement = Placement(nodes, node_rank, master)
        node = settings.but(**placement.settings(), prefect="off", node_addr=address_towards(host, int(port), settings))
        node_env = node.environ({**os.environ, **env})
        logger.info(f"node {node_rank} of {nodes}: joining the rendezvous on {master} (data {mine[:12]})")
        proc = processes.spawn([sys.executable, "-m", "flows.stages.train"], tie=True, cwd=ws, env=node_env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ended: list[str] = []

        def run_ended(run_id: str, state: str) -> None:  # node 0's run ended (its ranks are gone), or this one is cancelled
            ended.append(f"node 0's run {run_id} is {state}" if run_id == leader_run else f"this run is {state}")
            proc.signal(signal.SIGTERM)

        from prefect.runtime import flow_run

        watch = Watch([i for i in (leader_run, flow_run.id) if i], run_ended).start()
        try:
            for line in proc.stdout:
                if line.strip():
                    logger.info(line.rstrip())
        finally:
            watch.stop()
        flush_labels()
        if proc.wait() != 0:
            if ended:
                raise TunedeckError(f"node {node_rank} of {nodes}: stopped because {ended[0]}.")
            raise TunedeckError(f"node {node_rank} of {nodes}: its training processes failed (exit {proc.returncode}).")
    return {"node_rank": node_rank, "nodes": nodes, "data_version": mine}
