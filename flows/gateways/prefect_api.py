"""The door to Prefect's API from any process: where the API is, whether it answers, its credentials, and every call
tunedeck makes through Prefect's client (end a run, its tags and labels, runs of a deployment, pools, limits, the
zombie automation). No other module imports prefect.client (tests/unit/test_floor_plan.py), but the two it names.

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
from uuid import UUID

from flows.core.errors import TunedeckError
from flows.gateways import processes

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
        return processes.alive(pid)
    return b"prefect" in cmdline and b"server" in cmdline


def local_url(root: Path | None = None) -> str | None:
    """The API URL of this project's local server, when it is running."""
    record = server_record(root)
    return record["url"] if record else None


def api_url(root: Path | None = None) -> str | None:
    """The Prefect API stages report to: PREFECT_API_URL if set, else the local server's."""
    return os.environ.get("PREFECT_API_URL") or local_url(root)


@contextlib.contextmanager
def _client(client=None):
    """A sync PrefectClient for one call (or the one a test hands in)."""
    if client is not None:
        yield client
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as fresh:
        yield fresh


def end_run(run_id, state, if_open: bool = True, client=None) -> bool:
    """Force flow run run_id into state (a Prefect State: Crashed, Cancelling, a stage's end); the one place tunedeck
    ends a run that its own engine cannot. With if_open, a run already final keeps its state (its engine got there
    first). True when the state was set. Server errors propagate (callers retry or give up)."""
    with _client(client) as api:
        if if_open:
            current = api.read_flow_run(run_id).state
            if current is not None and current.is_final():
                return False
        api.set_flow_run_state(run_id, state, force=True)
    return True


def add_tags(run_id: str, tags: list[str]) -> None:
    """Add tags to a flow run, keeping those it has."""
    with _client() as api:
        current = api.read_flow_run(run_id).tags or []
        api.update_flow_run(run_id, tags=sorted({*current, *tags}))


def take_slot(name: str, lease_s: float, run_id: str | None = None):
    """One request for a slot of the global concurrency limit name, leased for lease_s (held by flow run run_id):
    the lease id, or None when the slot is taken. Other server errors propagate (httpx)."""
    import httpx
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(run_id)) if run_id else None
    try:
        with _client() as api:
            response = api.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=lease_s, holder=holder)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == SLOT_TAKEN:
            return None
        raise
    return UUID(response.json()["lease_id"])


def renew_slot(lease_id, lease_s: float) -> None:
    """Keep a slot's lease for lease_s more; errors propagate (httpx: 410 when the server no longer holds it)."""
    with _client() as api:
        api.renew_concurrency_lease(lease_id=lease_id, lease_duration=lease_s)


def release_slot(lease_id) -> None:
    """Free a slot's lease; errors propagate (httpx)."""
    with _client() as api:
        api.release_concurrency_slots_with_lease(lease_id)


SLOT_TAKEN = 423  # the server's answer to a slot request when the slot is held


class Session:
    """One client held for many calls: a run's label thread sends every update of the run through one."""

    def __init__(self, client) -> None:
        self._api = client

    def set_labels(self, run_id: str, labels: dict) -> None:
        self._api.update_flow_run_labels(run_id, labels)

    def progress(self, run_id: str, key: str, percent: float, artifact=None, task_run_id=None):
        """Create (artifact None) or update a progress artifact shown in Prefect's UI; its id."""
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        if artifact is not None:
            self._api.update_artifact(artifact, ArtifactUpdate(data=percent))
            return artifact
        return self._api.create_artifact(ArtifactCreate(
            type="progress", key=key, data=percent, description="epochs done", flow_run_id=run_id,
            task_run_id=task_run_id)).id


@contextlib.contextmanager
def session() -> Iterator[Session]:
    """A Session over one sync client, closed at the end."""
    with _client() as api:
        yield Session(api)


class AsyncSession:
    """One async client held for a run's life: a stage's reporter watches its run for a cancel and sets its labels
    through one, through outages."""

    def __init__(self, client) -> None:
        self._api = client

    async def run_state(self, run_id: str) -> str | None:
        """The run's state type now (RUNNING, CANCELLING, ...); errors propagate."""
        state = (await self._api.read_flow_run(run_id)).state
        return state.type.value if state is not None else None

    async def set_labels(self, run_id: str, labels: dict) -> None:
        await self._api.update_flow_run_labels(run_id, labels)


@contextlib.asynccontextmanager
async def async_session():
    """An AsyncSession over one async client, closed at the end (inside a flow run's event loop)."""
    from prefect.client.orchestration import get_client

    async with get_client() as api:
        yield AsyncSession(api)


def completed_runs(flow_names: list[str], limit: int = 20) -> list[tuple[list[str], dict]]:
    """The tags and labels of the newest completed runs of these flows (at most 200: the API's limit), newest first."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType as Types
    from prefect.client.schemas.sorting import FlowRunSort

    completed = FlowRunFilter(state=FlowRunFilterState(type=Types(any_=["COMPLETED"])))
    with _client() as api:
        runs = api.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=flow_names)),
                                  flow_run_filter=completed, sort=FlowRunSort.END_TIME_DESC, limit=limit)
    return [(list(run.tags or []), dict(run.labels or {})) for run in runs]


def auth() -> tuple[str, str] | None:
    """The API's basic auth (PREFECT_API_AUTH_STRING, user:password), if set."""
    user, sep, password = os.environ.get("PREFECT_API_AUTH_STRING", "").partition(":")
    return (user, password) if sep else None


def rest(timeout: float = 3.0):
    """A plain HTTP client for Prefect's REST API, with its auth: for the callers that must not import Prefect's own
    client (seconds of start-up: the dashboard, a worker's telemetry thread, the monitor's events). Every raw call to
    the server goes through one made here."""
    import httpx

    return httpx.Client(timeout=timeout, auth=auth())


def event(name: str, resource_id: str, resource_name: str, payload: dict, occurred: float | None = None) -> dict:
    """One Prefect event as POST /events takes it (a list of these)."""
    import time
    import uuid
    from datetime import UTC, datetime

    return {"id": str(uuid.uuid4()), "occurred": datetime.fromtimestamp(occurred or time.time(), tz=UTC).isoformat(),
            "event": name, "resource": {"prefect.resource.id": resource_id, "prefect.resource.name": resource_name},
            "payload": payload, "related": []}


def post_events(client, api_url: str, events: list[dict], timeout: float | None = None) -> None:
    """POST the events through client (rest()); an answer of 300 or more raises httpx.HTTPError."""
    import httpx

    answer = client.post(f"{api_url.rstrip('/')}/events", json=events, **({"timeout": timeout} if timeout else {}))
    if answer.status_code >= 300:
        raise httpx.HTTPError(f"HTTP {answer.status_code}")


def cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """Run the prefect CLI of this environment, without prompts (`prefect deploy` reads prefect.yaml); its
    CompletedProcess, output captured."""
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "prefect"
    return subprocess.run([str(exe), "--no-prompt", *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True)


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


def start_deployment_run(deployment: str, parameters: dict, name: str | None = None, queue: str | None = None,
                         client=None) -> str:
    """A new flow run of deployment FLOW/NAME with parameters (and a run name), for its work pool's workers (with
    queue: those polling that work queue of the pool); its id. One sentence when the server has no such deployment."""
    from prefect.exceptions import ObjectNotFound

    with _client(client) as api:
        try:
            found = api.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise TunedeckError(f"the Prefect server has no deployment {deployment}: run `tunedeck deploy` in the "
                                "project first.") from None
        return str(api.create_flow_run_from_deployment(found.id, parameters=parameters, name=name,
                                                       work_queue_name=queue).id)


def ensure_queue(pool: str, name: str) -> None:
    """A work queue of that name in the pool, made where missing (by whichever worker is first)."""
    from prefect.exceptions import ObjectAlreadyExists

    with _client() as api, contextlib.suppress(ObjectAlreadyExists):
        api.create_work_queue(name=name, work_pool_name=pool)


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

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as api:
        runs = api.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in run_ids])),
                                     limit=len(run_ids))
    return {str(r.id): RunState(r.state.type.value if r.state else "PENDING", r.state.name if r.state else "Pending",
                                (r.state.message or "") if r.state else "", r.total_run_time.total_seconds())
            for r in runs}


def work_pool(name: str, create: bool) -> bool:
    """Whether the work pool exists on the server; with create, a process pool of that name is made when missing."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with _client() as api:
        try:
            api.read_work_pool(name)
            return True
        except ObjectNotFound:
            if not create:
                return False
            api.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


def ensure_limits(names: list[str], limit: int = 1) -> None:
    """A global concurrency limit of `limit` slots for each name, made where missing (by whichever worker is first)."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with _client() as api:
        for name in names:
            try:
                api.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with contextlib.suppress(ObjectAlreadyExists):  # another worker of this host made it meanwhile
                    api.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


def ensure_crash_on_silence(name: str, after_s: int, description: str, message: str) -> None:
    """The automation `name`: a flow run whose heartbeats stop for after_s seconds (and that did not end) is marked
    Crashed with message. Created once; updated when after_s changed since."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with _client() as api:
        found = api.read_automations_by_name(name)
        if found and found[0].trigger.within == timedelta(seconds=after_s):
            return
        ends = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
        automation = AutomationCore(
            name=name, description=description,
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=timedelta(seconds=after_s)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message=message)],
        )
        if found:
            api.update_automation(found[0].id, automation)
        else:
            api.create_automation(automation)


def current_run() -> dict | None:
    """The Prefect flow run this process runs in, and its deployment: {"flow_run", "flow_run_name", "deployment"}
    (None outside a flow run)."""
    try:
        from prefect.runtime import deployment, flow_run

        if not flow_run.id:
            return None
        return {"flow_run": str(flow_run.id), "flow_run_name": flow_run.name, "deployment": deployment.name}
    except Exception:  # noqa: BLE001 - no run context is no run, whatever Prefect raises for it
        return None
