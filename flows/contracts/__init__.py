"""What crosses a process boundary between tunedeck's parts, as typed models (pydantic).

Every message one process writes and another reads is defined here, once:

- the files stages hand each other: the prepare manifest (``data/prepared/manifest.json``),
  the model card (``models/model.json``), and the run file a stage writes for the dashboard
  (``.tunedeck/runs/<pid>.json``);
- the lines a stage and its reporter exchange (flows.stages.orchestration ↔ flows.stages.reporter), and the
  lines of the DVC helper's protocol (flows.gateways.dvc.session);
- a training stage's progress (``StageProgress``): printed as a marked line to the pipeline
  run that started the stage, or sent to the stage's reporter, and stored on the flow run as
  Prefect labels, so the dashboard of any host reads it from the server alone;
- a host's telemetry (``HostTelemetry``): what a worker publishes as a Prefect event every few
  seconds, and the dashboard's GPU panel reads back, grouped by host;
- metric names: one spelling (``val/acc``), whatever wrote them (DVC flattens to ``val.acc``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.core.errors import TunedeckError

PROGRESS_MARK = "\x1etunedeck-progress "
"""A stage's stdout line carrying a StageProgress (the pipeline flow turns it into labels)."""

LABEL = "tunedeck."
"""The prefix of every flow run label tunedeck sets."""

TELEMETRY_EVENT = "tunedeck.host.telemetry"
"""The Prefect event a worker emits with its host's GPUs, CPU and RAM."""

TELEMETRY_EVERY_S = 3.0
"""How often a worker publishes its host's telemetry."""

STALE_AFTER_S = 10.0
"""A host whose last telemetry is older than this shows as stale."""


def metric_name(name: str) -> str:
    """The one spelling of a metric: slashes, as the trainer logs it (`val.acc` → `val/acc`)."""
    return name.replace(".", "/")


TEST_ACC = "test/acc"
"""The evaluate stage's test accuracy, as a run's label carries it (eval/metrics.json's ``accuracy``)."""

TEST_MACRO_F1 = "test/macro_f1"
"""The evaluate stage's test macro-F1 (eval/metrics.json's ``macro_f1``)."""

SCORE_PREFIX = "test/"
"""Metrics under this prefix are a finished run's scores, not a training epoch's."""


def eval_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """eval/metrics.json's headline numbers under their label names (test/acc, test/macro_f1); missing ones left out."""
    pairs = ((TEST_ACC, metrics.get("accuracy")), (TEST_MACRO_F1, metrics.get("macro_f1")))
    return {name: float(value) for name, value in pairs if isinstance(value, int | float)}


class StageProgress(BaseModel):
    """One finished epoch of a training stage: where it is, its latest metrics, the time left."""

    model_config = ConfigDict(frozen=True)

    stage: str = "train"
    epoch: int = Field(ge=1, description="epochs finished, counting from 1")
    epochs: int = Field(ge=1, description="epochs the stage will run at most")
    metrics: dict[str, float] = Field(default_factory=dict, description="metric_name() → value")
    eta_s: float | None = Field(default=None, ge=0)
    at: float = Field(default_factory=time.time, description="unix time of the epoch's end")
    final: bool = Field(default=False, description="a stage's final scores (evaluate's test metrics), not an epoch")

    @classmethod
    def scores(cls, stage: str, metrics: dict[str, float]) -> StageProgress:
        """A stage's final scores: published like progress, but labels() carries the metrics alone, so a
        pipeline run keeps the epoch k/N and the val metrics its training left."""
        return cls(stage=stage, epoch=1, epochs=1, metrics=metrics, final=True)

    def line(self) -> str:
        """The marked stdout line a stage prints for the pipeline run above it."""
        return PROGRESS_MARK + self.model_dump_json()

    @classmethod
    def from_line(cls, line: str) -> StageProgress | None:
        """The progress a marked line carries; None for any other line (or a garbled one)."""
        if not line.startswith(PROGRESS_MARK):
            return None
        try:
            return cls.model_validate_json(line[len(PROGRESS_MARK):])
        except ValidationError:
            return None

    def labels(self) -> dict[str, Any]:
        """The flow run labels that carry this progress (Prefect labels are flat scalars); final scores: the metrics alone."""
        metrics = {f"{LABEL}metric.{metric_name(k)}": round(float(v), 6) for k, v in self.metrics.items()}
        if self.final:
            return metrics
        out: dict[str, Any] = {
            f"{LABEL}stage": self.stage, f"{LABEL}epoch": self.epoch, f"{LABEL}epochs": self.epochs,
            f"{LABEL}eta_s": round(self.eta_s, 1) if self.eta_s is not None else -1.0, f"{LABEL}at": round(self.at, 1),
        }
        out.update(metrics)
        return out

    @classmethod
    def from_labels(cls, labels: dict[str, Any] | None) -> StageProgress | None:
        """The progress a flow run's labels carry; None when they carry none (or not a valid one)."""
        labels = labels or {}
        if f"{LABEL}epoch" not in labels:
            return None
        prefix = f"{LABEL}metric."
        eta = labels.get(f"{LABEL}eta_s")
        try:
            return cls(
                stage=str(labels.get(f"{LABEL}stage") or "train"), epoch=int(labels[f"{LABEL}epoch"]),
                epochs=int(labels.get(f"{LABEL}epochs") or labels[f"{LABEL}epoch"]),
                metrics={k[len(prefix):]: float(v) for k, v in labels.items() if k.startswith(prefix)},
                eta_s=float(eta) if eta is not None and float(eta) >= 0 else None, at=float(labels.get(f"{LABEL}at") or 0),
            )
        except (ValidationError, TypeError, ValueError):
            return None


def scores_from_labels(labels: dict[str, Any] | None) -> dict[str, float]:
    """The final scores a flow run's labels carry (test/acc, test/macro_f1), whether or not it trained."""
    prefix = f"{LABEL}metric.{SCORE_PREFIX}"
    found = {}
    for key, value in (labels or {}).items():
        if key.startswith(prefix):
            try:
                found[key[len(LABEL) + len("metric."):]] = float(value)
            except (TypeError, ValueError):
                continue
    return found


def stage_label(labels: dict[str, Any] | None) -> str | None:
    """The stage a pipeline run is in now (its `tunedeck.stage` label)."""
    value = (labels or {}).get(f"{LABEL}stage")
    return str(value) if value else None


def stage_labels(stage: str) -> dict[str, Any]:
    """The labels a pipeline run gets when a stage starts."""
    return {f"{LABEL}stage": stage}


# --- host telemetry ----------------------------------------------------------------------------------


class GpuReading(BaseModel):
    """One GPU at one moment; what a device does not report is None."""

    index: int
    name: str
    util: float | None = None
    mem_used_mib: float | None = None
    mem_total_mib: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    processes: list[tuple[int, float | None, str | None]] = Field(
        default_factory=list, description="(pid, MiB used, flow run id or None) of each process on the GPU")
    note: str | None = Field(None, description="why the metrics are missing: a device no reader reads (flows.gateways.drm)")


class HostTelemetry(BaseModel):
    """One host's telemetry sample, as a worker publishes it."""

    host: str
    at: float = Field(default_factory=time.time)
    cpu_percent: float
    cpu_count: int
    ram_used_gib: float
    ram_total_gib: float
    disk_used_gib: float = 0.0
    disk_total_gib: float = 0.0
    gpus: list[GpuReading] = Field(default_factory=list)
    no_gpu: str | None = None
    worker: str | None = Field(default=None, description="the work pool of the worker that publishes it")
    offline: bool = Field(default=False, description="the worker stopped: its last word")

    def stale(self, now: float | None = None) -> bool:
        """Whether the host has stopped reporting (its sample is older than STALE_AFTER_S)."""
        return self.offline or (now if now is not None else time.time()) - self.at > STALE_AFTER_S


def dumps(model: BaseModel) -> str:
    """A model as one JSON line."""
    return json.dumps(model.model_dump(mode="json"), separators=(",", ":"))


# --- files stages hand each other ------------------------------------------------------------------


class BadFile(TunedeckError):
    """A file another stage wrote is missing or not what it should be; its text is one sentence."""


class StageFile(BaseModel):
    """A JSON file one stage writes into its output folder and later stages read back."""

    FILE: ClassVar[str]
    REMEDY: ClassVar[str]  # what to do when it is missing or broken

    @classmethod
    def read(cls, folder: Path) -> Self:
        """The file in folder; BadFile (one sentence naming it and what to do) when it is missing or broken."""
        path = folder / cls.FILE
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise BadFile(f"{path} not found: {cls.REMEDY}") from None
        except (OSError, ValidationError, ValueError) as exc:
            first = exc.errors()[0] if isinstance(exc, ValidationError) else None
            why = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else type(exc).__name__
            raise BadFile(f"{path} is not a valid {cls.__name__} ({why}): {cls.REMEDY}") from None

    def write(self, folder: Path) -> None:
        (folder / self.FILE).write_text(self.model_dump_json(indent=2))


class PrepareManifest(StageFile):
    """data/prepared/manifest.json: what the prepare stage decoded, for train and evaluate."""

    FILE: ClassVar[str] = "manifest.json"
    REMEDY: ClassVar[str] = "run the prepare stage first (`dvc repro prepare`)."

    source: str
    data_version: str = Field(description="DVC's md5 of data.source")
    classes: list[str]
    image_size: int
    counts: dict[str, int] = Field(description="images per split")
    per_class: dict[str, dict[str, int]] = Field(default_factory=dict, description="split → class → images")


class ModelMeta(BaseModel):
    """What it takes to rebuild and feed a trained model: stored in the model's .safetensors file itself
    (its metadata, key ``tunedeck.model``), so one file from the registry is enough to predict."""

    model_name: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    interpolation: str
    data_version: str
    temperature: float = Field(default=1.0, gt=0, description="fitted on validation; predict divides logits by it")


class ModelCard(StageFile, ModelMeta):
    """models/model.json: how to rebuild, feed and trust the trained model beside it."""

    FILE: ClassVar[str] = "model.json"
    REMEDY: ClassVar[str] = "run the train stage first (`dvc repro train`)."

    weights_from: str
    best_epoch: int
    val_accuracy: float | None
    weights: str = Field(description="raw or ema: which weights were best")
    micro_batch: int
    accum_steps: int
    oom_events: int = 0
    sha256: str = Field(description="of model.safetensors")
    train_seconds: float
    privacy: dict | None = Field(None, description="a federated run's DP-SGD settings, each silo's (epsilon, delta) "
                                 "and secure aggregation (flows.federated.rounds.Federation.privacy_card)")

    def meta(self) -> ModelMeta:
        """The part of the card the model file carries."""
        return ModelMeta.model_validate(self.model_dump(include=set(ModelMeta.model_fields)))


class DriftStatistic(BaseModel):
    """One drift statistic of a monitored batch, against its threshold."""

    name: str
    value: float
    threshold: float
    flagged: bool
    direction: Literal["above", "below"] = Field(description="flagged when the value is above / below the threshold")


class Estimated(BaseModel):
    """A label-free estimate (a fraction) and its 95 % interval (flows.core.estimate)."""

    value: float
    low: float
    high: float


class MonitorBatch(BaseModel):
    """One batch the monitor scored (monitor/history.jsonl, and the payload of the `tunedeck.monitor.batch` event)."""

    at: float = Field(default_factory=time.time)
    host: str = ""
    folder: str
    model_version: str
    n_images: int
    failures: int = 0
    drifted: bool
    statistics: list[DriftStatistic]
    streak: int = Field(description="batches in a row with drift, this one included")
    triggered: bool = Field(default=False, description="this batch emitted tunedeck.drift.detected")
    estimated_accuracy: dict[str, Estimated] = Field(default_factory=dict, description="atc, confidence: no labels used")
    priors: dict[str, Estimated] = Field(default_factory=dict, description="each class's estimated share (BBSE)")
    reference_accuracy: float | None = Field(default=None, description="the model's measured held-out accuracy")
    accuracy: float | None = Field(default=None, description="measured, when the batch came labelled (class folders)")
    estimator: str | None = Field(default=None, description="the estimate harm was judged on (monitor.estimator)")
    harmful: bool | None = Field(default=None, description="the estimated accuracy fell by more than monitor.estimated_drop")
    counted: bool | None = Field(default=None, description="counts toward a retrain under monitor.trigger (None: "
                                                           "recorded before the trigger had modes; drifted counted)")


MONITOR_EVENT = "tunedeck.monitor.batch"
"""The event the monitor emits for every batch (the dashboard reads them back)."""

DRIFT_EVENT = "tunedeck.drift.detected"
"""The event that starts a retrain (prefect.yaml: the pipeline deployment's trigger)."""


class RunFile(BaseModel):
    """.tunedeck/runs/<pid>.json: the flow run a stage process (not started by a worker) belongs to."""

    flow_run_id: str
    name: str = ""
    stage: str = ""


# --- a stage and its reporter (flows.stages.orchestration -> flows.stages.reporter, JSON lines on stdin) -------------


class ReporterOpen(BaseModel):
    """The first line: which flow run to open."""

    name: str
    api_url: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)


def reporter_message(line: str) -> dict[str, Any]:
    """One later line, checked: exactly one of log, progress (then a StageProgress), done, failed."""
    message = json.loads(line)
    kinds = [k for k in ("log", "progress", "done", "failed") if k in message]
    if len(kinds) != 1:
        raise ValueError(f"a reporter message has one of log, progress, done, failed; this one has {kinds or 'none'}")
    if kinds[0] == "progress":
        message["progress"] = StageProgress.model_validate(message["progress"])
    return message


class ReporterAnswer(BaseModel):
    """What the reporter answers on stdout: the run it opened, then its final state."""

    flow_run_id: str | None = None
    url: str | None = None
    name: str | None = None
    final: str | None = None


# --- the DVC helper (flows.gateways.dvc.session: JSON lines in, output lines then a marked answer out) ----------


class DvcRequest(BaseModel):
    """A question to the DVC helper: a stage's up-to-date key, the stages in order, or a `dvc` command."""

    op: Literal["key", "stages", "dvc"]
    cwd: str | None = Field(default=None, description="the folder to answer in (the helper starts before it exists)")
    stage: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class DvcAnswer(BaseModel):
    """The helper's answer: the stage's key (None: it must run), the stages, or the command's exit status."""

    key: str | None = None
    stages: list[str] = Field(default_factory=list)
    rc: int | None = None
