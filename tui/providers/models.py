"""The plain frozen dataclasses that providers hand to the dashboard: nothing else crosses the layer."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CRASHED", "CANCELLED"})
STATES = ("SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CRASHED", "CANCELLING", "CANCELLED", "PAUSED")


@dataclass(frozen=True)
class GpuProcess:
    """One process holding memory on a GPU, and the flow run it belongs to (when known)."""

    pid: int
    used_mib: float | None
    flow_run_id: str | None = None


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one moment; a metric the device does not report is None (shown N/A)."""

    index: int
    name: str
    util: float | None
    mem_used_mib: float | None
    mem_total_mib: float | None
    temp_c: float | None
    power_w: float | None
    power_limit_w: float | None
    sm_clock_mhz: float | None
    mem_clock_mhz: float | None
    processes: tuple[GpuProcess, ...] = ()
    note: str | None = None
    """Why its metrics are missing (a device no reader reads), shown in their place."""


@dataclass(frozen=True)
class HostSample:
    """The host's CPU, RAM and disk (psutil)."""

    hostname: str
    cpu_percent: float
    cpu_count: int
    ram_used_gib: float
    ram_total_gib: float
    disk_used_gib: float
    disk_total_gib: float


@dataclass(frozen=True)
class RemoteHost:
    """Another host's GPUs, as its worker last published them through the Prefect server."""

    host: HostSample
    gpus: tuple[GpuSample, ...]
    age_s: float
    """Seconds since the sample was taken."""
    stale: bool
    """The host stopped reporting (its worker stopped, or nothing came for 10 s)."""
    no_gpu: str | None = None
    worker: str | None = None


@dataclass(frozen=True)
class Telemetry:
    """One telemetry sample: this host and its GPUs (``no_gpu`` says why there are none), then other hosts'."""

    host: HostSample
    gpus: tuple[GpuSample, ...]
    no_gpu: str | None = None
    remote: tuple[RemoteHost, ...] = ()


@dataclass(frozen=True)
class Run:
    """One Prefect flow run, as the runs list shows it."""

    id: str
    name: str
    flow: str
    state: str
    state_name: str
    start: float | None
    duration_s: float | None
    deployment: str | None = None
    deployment_id: str | None = None
    tags: tuple[str, ...] = ()
    parameters: dict = field(default_factory=dict, compare=False, hash=False)
    stage: str | None = None
    """The stage a pipeline run is in (its ``tunedeck.stage`` label); None for a stage's own run."""
    progress: Progress | None = None
    """The training progress the run published through the Prefect server (its labels)."""
    host: str | None = None
    """The host whose worker runs it (its ``tunedeck.host`` label), when known."""
    gpus: tuple[int, ...] = ()
    """The GPUs it holds on that host (its ``tunedeck.gpus`` label)."""
    scores: tuple[tuple[str, float], ...] = ()
    """The final scores its evaluate stage published (``test/acc``, ``test/macro_f1`` labels), once evaluated."""
    cost: tuple[tuple[str, float | str], ...] = ()
    """Its training's energy and cost (``energy/gpu_wh``, ``energy/cpu_wh``, ``cost/device_hours``, ``cost/total``
    labels; "unknown" where a counter could not be read), once trained."""

    def score(self, name: str) -> float | None:
        """One final score (``test/acc``), or None before the run was evaluated."""
        return dict(self.scores).get(name)

    @property
    def current_stage(self) -> str:
        """What the STAGE column shows: the stage a pipeline run is in (or failed in), else the flow."""
        return self.stage if self.stage and self.state != "COMPLETED" else self.flow

    @property
    def data_version(self) -> str | None:
        """The ``data:<md5>`` tag the stage put on the run."""
        return _tag(self.tags, "data:")

    @property
    def model_version(self) -> str | None:
        """The ``model:<sha256>`` tag the stage put on the run."""
        return _tag(self.tags, "model:")


def _tag(tags: tuple[str, ...], prefix: str) -> str | None:
    return next((t.removeprefix(prefix) for t in tags if t.startswith(prefix)), None)


@dataclass(frozen=True)
class RunQuery:
    """Which page of runs to fetch: a text filter, state types, and a page window."""

    text: str = ""
    states: tuple[str, ...] = ()
    offset: int = 0
    limit: int = 100


@dataclass(frozen=True)
class WorkPool:
    """A Prefect work pool and the health of its workers."""

    name: str
    status: str
    workers_online: int
    workers_total: int


@dataclass(frozen=True)
class Deployment:
    """A Prefect deployment: its schedule, the next runs, the last state and its pool."""

    id: str
    name: str
    flow: str
    schedule: str
    paused: bool
    next_runs: tuple[float, ...]
    last_state: str | None
    work_pool: str | None
    parameter_names: tuple[str, ...] = ()
    schedule_active: bool = True
    """False when the deployment has schedules and every one is inactive: no run starts on its own."""


@dataclass(frozen=True)
class Orchestration:
    """What the Prefect server says: a page of runs, the deployments and pools; or why it could not."""

    connected: bool
    url: str | None
    runs: tuple[Run, ...] = ()
    total_runs: int = 0
    deployments: tuple[Deployment, ...] = ()
    pools: tuple[WorkPool, ...] = ()
    error: str | None = None
    running: tuple[Run, ...] = ()


@dataclass(frozen=True)
class RunDetail:
    """What the detail view shows beside the run: its log lines and summary artifacts."""

    logs: tuple[str, ...]
    artifacts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Progress:
    """Live training progress: epoch (0-based step), total epochs, latest metrics (``val/acc``), ETA.

    From the run's labels on the Prefect server, or from this project's dvclive files.
    """

    step: int
    epochs: int | None
    metrics: tuple[tuple[str, float], ...]
    updated: float
    eta_s: float | None = None


@dataclass(frozen=True)
class Experiment:
    """One row of ``dvc exp show``: name, revision, params and metrics, flattened to dotted keys."""

    name: str
    rev: str
    params: tuple[tuple[str, str], ...]
    metrics: tuple[tuple[str, float | str], ...]
    """numbers, or "unknown" where a run could not measure one (its CPU energy without RAPL)"""
    running: str = ""
    """What the flow run making this experiment does now ("train 8/12"); empty for a saved experiment."""


@dataclass(frozen=True)
class RegistryEvent:
    """One line of the model registry's history: a version registered, or made prod."""

    at: float  # unix time
    version: str
    what: str  # "registered" or "-> prod"
    message: str


@dataclass(frozen=True)
class Registry:
    """The model registry (GTO tags): the prod version, every version with its commit, the history newest first."""

    prod: str | None = None
    versions: tuple[tuple[str, str], ...] = ()  # (version, commit)
    history: tuple[RegistryEvent, ...] = ()

    def version_of(self, rev: str) -> str | None:
        """The registered version of a commit (a full or short hash), if any."""
        if not rev:
            return None
        return next((version for version, commit in self.versions if commit.startswith(rev) or rev.startswith(commit)), None)


@dataclass(frozen=True)
class Curves:
    """Training curves from dvclive plots: metric name → (steps, values)."""

    series: tuple[tuple[str, tuple[float, ...], tuple[float, ...]], ...]


@dataclass(frozen=True)
class DriftPoint:
    """One drift statistic of a batch against its threshold."""

    name: str
    value: float
    threshold: float
    flagged: bool
    direction: str  # "above" or "below": where the value must be to flag drift


@dataclass(frozen=True)
class MonitoredBatch:
    """One batch the monitor scored."""

    at: float
    folder: str
    model_version: str
    n_images: int
    drifted: bool
    streak: int
    triggered: bool
    statistics: tuple[DriftPoint, ...]
    estimated: tuple[float, float, float] | None = None  # accuracy without labels (ATC): value, 95 % low, high
    reference_accuracy: float | None = None  # the model's measured held-out accuracy
    accuracy: float | None = None  # measured, when the batch came labelled
    priors: tuple[tuple[str, float], ...] = ()  # each class's estimated share (BBSE)


@dataclass(frozen=True)
class Retrain:
    """A pipeline run the drift trigger started."""

    name: str
    state: str
    reason: str
    started: float | None


@dataclass(frozen=True)
class MonitorView:
    """The monitor's last batches (oldest first) and the retrains drift started (newest first)."""

    batches: tuple[MonitoredBatch, ...] = ()
    retrains: tuple[Retrain, ...] = ()
    error: str | None = None


NESTED = {"host": HostSample, "gpus": GpuSample, "remote": RemoteHost, "progress": Progress, "processes": GpuProcess, "runs": Run, "running": Run,
          "deployments": Deployment, "pools": WorkPool}
"""The dataclass each nested field holds, for build(): a field's name says what it holds, in every dataclass here."""


def build(cls: type, data: dict[str, Any]) -> Any:
    """A frozen dataclass from its asdict() form (lists back to tuples, nested types rebuilt); a key the
    dataclass lacks is left out. Here, beside the dataclasses, so the replay and the recording both use it."""
    values = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name in NESTED and isinstance(value, list) and all(isinstance(v, dict) for v in value):
            value = tuple(build(NESTED[f.name], v) for v in value)
        elif f.name in NESTED and isinstance(value, dict):
            value = build(NESTED[f.name], value)
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)
