"""The embedded default: a local Prefect server, SQLite under the project, bound to 127.0.0.1.

``tunedeck server start|stop|status`` drive it; stages find it through ``api_url()``. A team's
shared server runs the same way on a PostgreSQL database it names (``--database``, or Prefect's
own ``PREFECT_SERVER_DATABASE_CONNECTION_URL``): flows.host.server_database checks it first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from flows.core.errors import TunedeckError
from flows.gateways import processes
from flows.gateways.prefect_api import answers_401, healthy, local_url, server_alive, server_record, state_dir
from flows.host import server_database

DEFAULT_PORT = 4200
def database(root: Path | None = None) -> str | None:
    """What the running server stores its state in ("PostgreSQL at host:port/db"); None for the SQLite default."""
    record = server_record(root)
    return record.get("database") if record else None


def server_env(root: Path | None = None, database_url: str | None = None) -> dict[str, str]:
    """Environment for the server: PREFECT_HOME (and so its SQLite file) under the project, or the database named."""
    env = dict(os.environ)
    if database_url:
        env.pop(server_database.OLD_SETTING, None)
        env[server_database.SETTING] = database_url
    env["PREFECT_HOME"] = str(state_dir(root).resolve() / "prefect")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # SQLite allows one writer; with several workers and runs writing at once on a small machine
    # the default 10 s wait for the lock can run out (the API then answers 503). Wait longer.
    env.setdefault("PREFECT_SERVER_DATABASE_TIMEOUT", "30")
    # hosts publish telemetry events every few seconds and a silent host shows stale after 10 s:
    # events reach the database within a second, not the default 5
    env.setdefault("PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL", "1")
    # concurrency slots' leases on disk, beside the database: in memory (Prefect's default) a restart forgets
    # them while the database still counts their slots as taken, so a GPU's slot stays taken for good
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")
    env.pop("PREFECT_API_URL", None)
    return env


AUTH_VARIABLE = "PREFECT_SERVER_API_AUTH_STRING"


def check_exposure(host: str) -> None:
    """Serving beyond 127.0.0.1 needs Prefect's server auth string (user:password)."""
    if host not in ("127.0.0.1", "localhost") and ":" not in os.environ.get(AUTH_VARIABLE, ""):
        raise TunedeckError(
            f"serving Prefect on {host} lets anyone who reaches it run code: set {AUTH_VARIABLE}=user:password "
            "first (workers then set PREFECT_API_AUTH_STRING to the same), or keep the default 127.0.0.1."
        )


def start(port: int = DEFAULT_PORT, root: Path | None = None, timeout: float = 90.0, host: str = "127.0.0.1",
          database_url: str | None = None) -> str:
    """Start the local server in the background and wait until it answers; return its API URL.

    database_url (else Prefect's database setting, else SQLite under the project) is checked first.
    """
    running = local_url(root)
    if running:
        return running
    check_exposure(host)
    named = (database_url, "--database") if database_url else server_database.from_environment()
    described = server_database.check(*named) if named else None
    url = f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}/api"
    with socket.socket() as probe:
        if probe.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0:
            raise TunedeckError(
                f"port {port} on {host} is already in use: stop what holds it, or pass --port to use another."
            )
    folder = state_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "server.log"
    with open(log_path, "wb") as log:
        # not tied, and a session of its own: the server outlives `tunedeck server start`; stop() ends its group
        proc = processes.spawn(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], tie=False,
            group=True, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=server_env(root, named[0] if named else None), cwd=root or Path.cwd(),
        )
    (folder / "server.json").write_text(json.dumps({"pid": proc.pid, "url": url, "port": port, "database": described}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log_path.read_text(errors="replace")
            why = described and server_database.start_failure(text, described)
            tail = text.strip().splitlines()[-1:] or ["no output"]
            raise TunedeckError(f"{why[:-1]} (see {log_path})." if why else
                                f"the Prefect server exited at start ({tail[0][:200]}): see {log_path}.")
        if healthy(url) or answers_401(url):
            return url
        time.sleep(0.3)
    stop(root)
    raise TunedeckError(f"the Prefect server did not answer within {timeout:.0f} s: see {log_path}.")


def stop(root: Path | None = None, timeout: float = 15.0) -> bool:
    """Stop the local server this project started; False when none was running."""
    record = server_record(root)
    path = state_dir(root) / "server.json"
    if record is None:
        path.unlink(missing_ok=True)
        return False
    processes.stop_group(record["pid"], lambda pid: not server_alive(pid) or processes.ended(pid), grace_s=timeout)
    path.unlink(missing_ok=True)
    return True
