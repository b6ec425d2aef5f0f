"""One user's machine in a test: a tiny project, its own Prefect server, its deployments and one `tunedeck worker`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.gateways.gpus import stand_in_env
from flows.host import server
from tests.integration.project import env, free_port, make_project, run


@dataclass(frozen=True)
class Cluster:
    """A tiny project, its own Prefect server on port, and one worker (its stderr in log)."""

    project: Path
    port: int
    url: str
    worker: subprocess.Popen
    log: Path


@contextlib.contextmanager
def cluster(folder: Path, gpus: int | None = None, **worker_env: str) -> Iterator[Cluster]:
    """A project in folder/clone, its server, `tunedeck deploy`, and a worker holding `gpus` stand-in GPUs (None:
    the worker's default), its own session so a test signals it alone. Each test gets its own (several kill their
    server, and order must not matter); everything is stopped at the end, whatever the test did."""
    project = make_project(folder / "clone")
    port = free_port()
    url = server.start(port, root=project)
    worker = None
    try:
        run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
        command = ["tunedeck", "worker", "--pool", "local"]
        if gpus is not None:
            command += ["--gpus", ",".join(map(str, range(gpus)))]
            worker_env = {**stand_in_env(gpus, folder / "stand-in-gpus"), **worker_env}
        log = folder / "worker.log"
        worker = subprocess.Popen(command, cwd=project, env=env(PREFECT_API_URL=url, PREFECT_LOGGING_LEVEL="INFO", **worker_env),
                                  stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
        yield Cluster(project, port, url, worker, log)
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        server.stop(root=project)
