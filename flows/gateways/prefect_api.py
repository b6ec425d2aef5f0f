"""The door to Prefect's API from any process: where the API is, whether it answers, and its credentials.

The local server's record (``.tunedeck/server.json``, written by flows.host.server) says where this
project's own server listens; PREFECT_API_URL, when set, wins (a shared server).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

STATE = Path(".tunedeck")


def state_dir(root: Path | None = None) -> Path:
    """Where the server keeps its database, log and pid (``.tunedeck/`` in the project)."""
    return (root or Path.cwd()) / STATE


def healthy(url: str, timeout: float = 0.5) -> bool:
    """Whether a Prefect API answers /health at url within timeout seconds."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def answers_401(url: str) -> bool:
    """Whether an auth-protected server is up (it refuses us without credentials)."""
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=0.5)
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except (OSError, ValueError):
        return False
    return False


def server_record(root: Path | None = None) -> dict | None:
    """The local server's record (url, pid, database) when its process is alive; None otherwise."""
    path = state_dir(root) / "server.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if server_alive(record.get("pid", -1)) else None


def server_alive(pid: int) -> bool:
    """Whether pid is a running Prefect server (and not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    return b"prefect" in cmdline and b"server" in cmdline


def local_url(root: Path | None = None) -> str | None:
    """The API URL of this project's local server, when it is running."""
    record = server_record(root)
    return record["url"] if record else None


def api_url(root: Path | None = None) -> str | None:
    """The Prefect API stages report to: PREFECT_API_URL if set, else the local server's."""
    return os.environ.get("PREFECT_API_URL") or local_url(root)


def end_run(client, run_id, state, if_open: bool = True) -> bool:
    """Force flow run run_id into state (a Prefect State: Crashed, Cancelling, a stage's end) through client
    (a sync PrefectClient); the one place tunedeck ends a run that its own engine cannot. With if_open, a
    run already final keeps its state (its engine got there first). True when the state was set."""
    if if_open:
        current = client.read_flow_run(run_id).state
        if current is not None and current.is_final():
            return False
    client.set_flow_run_state(run_id, state, force=True)
    return True


def auth() -> tuple[str, str] | None:
    """The API's basic auth (PREFECT_API_AUTH_STRING, user:password), if set."""
    user, sep, password = os.environ.get("PREFECT_API_AUTH_STRING", "").partition(":")
    return (user, password) if sep else None


@contextlib.contextmanager
def using(url: str) -> Iterator[None]:
    """Prefect's clients in this process (and the CLIs it starts) talk to url, also when Prefect was imported before
    the server was known (its settings are read once, at import)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def start_deployment_run(deployment: str, parameters: dict, name: str | None = None) -> str:
    """A new flow run of deployment FLOW/NAME with parameters (and a run name), for its work pool's workers; its id."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = client.read_deployment_by_name(deployment)
        return str(client.create_flow_run_from_deployment(found.id, parameters=parameters, name=name).id)


@dataclasses.dataclass(frozen=True)
class RunState:
    """Where a flow run stands: its state's type (e.g. COMPLETED) and name, the state's message, seconds it ran."""

    kind: str
    name: str
    message: str
    seconds: float

    @property
    def final(self) -> bool:
        return self.kind in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def run_states(run_ids: list[str]) -> dict[str, RunState]:
    """run id -> RunState of each flow run, in one request."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in run_ids])),
                                     limit=len(run_ids))
    return {str(r.id): RunState(r.state.type.value if r.state else "PENDING", r.state.name if r.state else "Pending",
                                (r.state.message or "") if r.state else "", r.total_run_time.total_seconds())
            for r in runs}
