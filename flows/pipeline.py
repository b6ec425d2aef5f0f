"""The Prefect flows deployments run: the DVC pipeline stage by stage, and an ad-hoc experiment.

Each run works in a workspace of its own (flows.workspace: a git worktree of the worker's
clone at its commit, sharing the DVC cache); its overrides go to that workspace's params.yaml
alone, and its results come back as a DVC experiment named after the flow run. Each DVC stage
is a Prefect task (`dvc repro --single-item <stage>`) in dvc.yaml's order, with retries and the
stage's DVC lock entry as its cache key: a retry skips finished stages, and the train stage
resumes from its checkpoint (kept per run key in the clone's checkpoints/, so a run started
again in a new workspace resumes too). The run holds a GPU slot (a Prefect global concurrency
limit of 1 per GPU) for its whole length, and pins the GPU with CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows import workspace
from flows.contracts import LABEL, ModelCard, StageProgress, eval_scores, stage_labels
from flows.core.errors import TunedeckError
from flows.dvc_cli import dvc, sync
from flows.dvc_session import DvcSession
from flows.gpus import gpu_states, host, slot_name
from flows.overrides import apply_overrides
from flows.slot_lease import SlotLease
from flows.stages.warm import WarmStages

LEASE_SECONDS = 60  # the shortest lease Prefect allows: a killed run's GPU slot frees within about a minute


_SESSION: DvcSession | None = None  # the run's DVC helper (flows.dvc_session), while a flow runs


def dvc_session() -> DvcSession:
    global _SESSION
    if _SESSION is None:
        _SESSION = DvcSession().start()
    return _SESSION


@contextlib.contextmanager
def open_session(cwd: Path) -> Iterator[DvcSession]:
    """Start the DVC helper now (it imports DVC while the run sets up its workspace and gets its slot); stop it at the end.

    It answers in cwd, or in the session's workdir once set (the run's workspace, made meanwhile).
    """
    global _SESSION
    _SESSION = DvcSession(cwd).start()
    try:
        yield _SESSION
    finally:
        _SESSION.close()
        _SESSION = None


def stage_cache_key(context, parameters) -> str | None:
    """The stage's dvc.lock entry when DVC says it is up to date; None (no cache) otherwise."""
    try:
        return dvc_session().up_to_date_key(parameters["stage"])
    except TunedeckError:
        return None


@task(retries=2, retry_delay_seconds=[5, 20], cache_key_fn=stage_cache_key, persist_result=True)
def run_stage(stage: str, env: dict[str, str]) -> str:
    """Reproduce one DVC stage, its output streamed into this run's log, its progress into the run's labels."""
    watch = StageWatch(stage, get_run_logger())
    dvc_session().repro(stage, {**env, "TUNEDECK_PREFECT": "off", "TUNEDECK_PROGRESS": "lines"}, on_line=watch.line)
    return stage


DVC_HINTS = ("To track the changes with git, run:", "git add ", "To enable auto staging, run:",
             "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.")


class StageWatch:
    """Where a stage's output goes: log lines to the run's log; progress lines to the run's labels.

    The labels (flows.contracts) are how any host's dashboard sees the stage, the epoch k/N, the
    val metrics and the ETA, from the Prefect server alone; a progress artifact shows the same
    fraction in Prefect's own UI.
    """

    def __init__(self, stage: str, logger) -> None:
        self.stage, self.logger = stage, logger
        label_run(stage_labels(stage))

    def line(self, text: str) -> None:
        progress = StageProgress.from_line(text)
        if progress is None:
            if not text.strip() or text.strip().startswith(DVC_HINTS):
                return  # DVC's advice to a person at a shell (git add dvc.lock, dvc push): the run does both
            self.logger.info(text)
            return
        if progress.final:  # the stage's scores (evaluate's test metrics): the run keeps its training's epoch
            label_run(progress.labels())
            return
        label_run(progress.labels(), (f"{self.stage}-progress", 100.0 * progress.epoch / progress.epochs))


class Labeller:
    """Publishes this flow run's labels (and a progress artifact for Prefect's UI) from a thread of its own,
    in order: the stages never wait on the server.

    One client for the run's life; flush() at the end sends what is queued. A server hiccup
    loses an update (the log has every epoch), never the run.
    """

    def __init__(self, run_id: str) -> None:
        import queue
        import threading

        self.run_id = run_id
        self.queue: queue.Queue[tuple | None] = queue.Queue()
        self.failed = 0
        self.artifacts: dict[str, object] = {}  # progress artifact key -> its id
        self.thread = threading.Thread(target=self._send, name="tunedeck-labels", daemon=True)
        self.thread.start()

    def _send(self) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while (item := self.queue.get()) is not None:
                try:
                    self._one(client, *item)
                except Exception:  # noqa: BLE001
                    self.failed += 1

    def _one(self, client, labels: dict, progress: tuple[str, float] | None, task_run_id) -> None:
        client.update_flow_run_labels(self.run_id, labels)
        if progress is None:
            return
        from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate

        key, percent = progress
        if key in self.artifacts:
            client.update_artifact(self.artifacts[key], ArtifactUpdate(data=percent))
        else:
            self.artifacts[key] = client.create_artifact(ArtifactCreate(
                type="progress", key=key, data=percent, description="epochs done", flow_run_id=self.run_id,
                task_run_id=task_run_id)).id

    def put(self, labels: dict, progress: tuple[str, float] | None, task_run_id) -> None:
        self.queue.put((labels, progress, task_run_id))

    def flush(self, timeout: float = 10.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


_LABELLER: Labeller | None = None


def label_run(labels: dict, progress: tuple[str, float] | None = None) -> None:
    """Merge labels into this flow run's soon, in the background (outside a flow run: nothing).

    progress: (artifact key, percent done) for a progress artifact in Prefect's UI.
    """
    global _LABELLER
    from prefect.runtime import flow_run, task_run

    if not flow_run.id:
        return
    if _LABELLER is None or _LABELLER.run_id != flow_run.id or not _LABELLER.thread.is_alive():
        _LABELLER = Labeller(flow_run.id)
    _LABELLER.put(labels, progress, task_run.id)


def flush_labels() -> None:
    """Send the labels still queued (the run is ending)."""
    global _LABELLER
    if _LABELLER is not None:
        _LABELLER.flush()
        if _LABELLER.failed:
            get_run_logger().warning(f"{_LABELLER.failed} progress update(s) did not reach the server; the log has them")
        _LABELLER = None


@contextlib.contextmanager
def device_slot(poll: float = 5.0) -> Iterator[dict[str, str]]:
    """Hold a free GPU of this worker (TUNEDECK_GPUS) for the run, or the host's CPU slot."""
    logger = get_run_logger()
    allowed = os.environ.get("TUNEDECK_GPUS")
    if not allowed:
        cpu = SlotLease(slot_name(None), "this host's CPU", LEASE_SECONDS, logger, run_id())
        while not cpu.take():
            time.sleep(poll)
        try:
            label_run({f"{LABEL}host": host()})
            yield {}
        finally:
            cpu.release()
        return
    wanted = [int(i) for i in allowed.split(",") if i.strip()]
    waited = False
    while True:
        for gpu in [g.index for g in gpu_states() if g.free and g.index in wanted]:
            slot = SlotLease(slot_name(gpu), f"GPU {gpu}", LEASE_SECONDS, logger, run_id())
            if not slot.take():  # held by another run (a slot survives a server restart: flows.slot_lease)
                continue
            try:
                logger.info("holding GPU %d (%s)", gpu, slot_name(gpu))
                label_run({f"{LABEL}host": host(), f"{LABEL}gpus": str(gpu)})
                yield {"CUDA_VISIBLE_DEVICES": str(gpu)}
            finally:
                slot.release()
            return
        if not waited:
            logger.info("all of GPUs %s are busy; waiting for one", allowed)
            waited = True
        time.sleep(poll)


@flow(name="pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, pull: bool = True, push: bool = True, promote: bool = True,
             reason: str = "") -> dict:
    """dvc pull, every stage of dvc.yaml in order, dvc push, the promotion gate, in the run's own workspace;
    overrides as key=value.

    The run ends as a DVC experiment named after the flow run (`dvc exp show` in the clone lists it);
    when the gate promotes its model, that experiment's commit is the new prod version (GTO tags).
    """
    if reason:  # what started it (the drift trigger says which batch), on the run for the dashboard
        get_run_logger().info(f"started by {reason}")
        label_run({f"{LABEL}reason": reason[:200]})
    return run_pipeline(overrides or [], pull, push, run_name(), promote)


def run_pipeline(overrides: list[str], pull: bool, push: bool, name: str, promote: bool = False) -> dict:
    """The stages in the run's own workspace, each a task; the results saved as DVC experiment `name`."""
    logger = get_run_logger()
    code = code_version()
    logger.info(f"code: {code}")
    clone = Path.cwd()
    with open_session(clone) as session, WarmStages() as warm, run_workspace(clone, overrides) as ws, device_slot() as env:
        session.workdir = ws
        env = {**env, "TUNEDECK_CHECKPOINTS": str(clone / "checkpoints")}  # per run key: a retry here resumes
        if pull:  # --allow-missing: a first run finds nothing on the remote yet
            sync("pull", "--allow-missing", cwd=ws, on_line=logger.info)
        elif workspace.tracks_dvc_data(ws):  # .dvc-tracked data (or a committed dvc.lock), linked from the shared cache
            timed("data checked out", lambda: dvc_session().run(["checkout", "--allow-missing"], on_line=logger.info))
        for stage in dvc_session().stage_order():
            if stage == "train" and (nodes := node_count(ws)) > 1:  # one run over several hosts: flows.multinode
                from flows.multinode import train_across_nodes

                label_run({f"{LABEL}nodes": nodes})  # a retry would find no nodes to meet: none
                train_across_nodes(ws, overrides, nodes, lambda more: run_stage.with_options(retries=0)("train", {**env, **more}))
            else:
                run_stage(stage, {**env, **warm.env()})
        label_scores(ws)
        if push:
            sync("push", cwd=ws, on_line=logger.info)
        # one gate at a time on this clone: two runs ending together would both judge against the same
        # prod and claim the same next version
        with workspace.host_lock(clone, "registry") if promote else contextlib.nullcontext():
            judgement = promotion_gate(ws) if promote else None
            timed("results saved as a DVC experiment", lambda: save_experiment(clone, ws, name))
            if judgement is not None and judgement.decision.promote:
                from flows.ship import exp_commit, register

                logger.info(f"registry: {' '.join(register(ws, judgement, exp_commit(ws, name)))} (prod)")
        session.close()  # before its folder, the workspace, goes
        versions = attach_versions(code, ws)
        if judgement is not None:
            versions.update(verdict=judgement.decision.verdict, promoted=judgement.decision.promote, version=judgement.version or judgement.prod_version or "")
        tag_versions(versions)
        flush_labels()
        return versions


def label_scores(ws: Path) -> None:
    """The test scores of the run's model (eval/metrics.json) on its labels: the evaluate stage sends them as it ends,
    and a stage DVC skipped as up to date sent none."""
    with contextlib.suppress(OSError, ValueError):
        scores = eval_scores(json.loads((ws / "eval/metrics.json").read_text()))
        if scores:
            label_run(StageProgress.scores("evaluate", scores).labels())


def node_count(ws: Path) -> int:
    """base.nodes of the run's params (a bad value is the train stage's one sentence to say)."""
    import yaml

    base = (yaml.safe_load((ws / "params.yaml").read_text()) or {}).get("base") or {}
    try:
        return int(base.get("nodes") or 1)
    except (TypeError, ValueError):
        return 1


@contextlib.contextmanager
def run_workspace(clone: Path, overrides: list[str]) -> Iterator[Path]:
    """The run's own worktree of the clone, with the overrides in its params.yaml; removed at the end.

    A bad override fails here, in one sentence, before any stage runs (the workspace goes with it).
    """
    import yaml

    logger = get_run_logger()
    tic = time.perf_counter()
    ws = workspace.create(clone, run_id())
    try:
        apply_overrides(ws / "params.yaml", overrides)
        source = yaml.safe_load((ws / "params.yaml").read_text())["data"]["source"]
        workspace.link_untracked_source(clone, ws, source)
        logger.info(f"isolation: workspace {ws} set up in {time.perf_counter() - tic:.2f} s")
        yield ws
    finally:
        timed("workspace removed", lambda: workspace.remove(clone, ws))


@task(name="promote", persist_result=False)
def promotion_gate(ws: Path):
    """The promotion gate on the run's model (flows.ship.judge), its verdict as a Prefect artifact."""
    from flows.core.params import load_params
    from flows.ship import judge, markdown

    judgement = judge(ws, load_params(ws / "params.yaml"), log=get_run_logger().info)
    create_markdown_artifact(markdown=markdown(judgement), key="promotion", description=judgement.decision.summary())
    return judgement


def timed(what: str, work) -> None:
    """Do work, then log `isolation: <what> in <seconds> s` (bench/deploy_latency.py adds these up)."""
    tic = time.perf_counter()
    work()
    get_run_logger().info(f"isolation: {what} in {time.perf_counter() - tic:.2f} s")


def save_experiment(clone: Path, ws: Path, name: str) -> None:
    """`dvc exp save` of the workspace as experiment <name>, one run of this clone at a time (shared git refs)."""
    workspace.git("add", "-A", cwd=ws)  # dvc.lock, metrics and plots: what `dvc exp run` would commit
    with workspace.host_lock(clone, "exp-save"):
        dvc_session().run(["exp", "save", "--force", "-n", name])
    get_run_logger().info(f"results saved as DVC experiment '{name}' (dvc exp show)")


def run_id() -> str:
    """This flow run's id (a local run outside Prefect's engine: a fresh one)."""
    import uuid

    from prefect.runtime import flow_run

    return flow_run.id or uuid.uuid4().hex


def run_name() -> str:
    """This flow run's name, the name of its DVC experiment."""
    from prefect.runtime import flow_run

    return flow_run.name or run_id()[:8]


@flow(name="experiment", log_prints=True)
def experiment(overrides: list[str] | None = None, name: str | None = None) -> dict:
    """An ad-hoc experiment, what `dvc exp run -n NAME -S ...` does: the stages with the overrides in the
    run's own workspace, saved as DVC experiment NAME (the flow run's name by default) for `dvc exp show`.

    Not `dvc exp run` itself: it moves git refs every workspace of the clone shares for the whole
    run, so two at once on one host would trip over each other; `dvc exp save` takes a second.
    """
    return run_pipeline(overrides or [], False, False, name or run_name())


def code_version() -> str:
    """`<folder> at <commit>` (with "+changes" when the tree differs from it): the code this run used."""
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return f"{Path.cwd()} (not a git clone)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return f"{Path.cwd()} at {head.stdout.strip()[:12]}" + ("+changes" if dirty.stdout.strip() else "")


def attach_versions(code: str, root: Path) -> dict:
    """The code, data and model versions (and test metrics) of the finished run in root, as an artifact."""
    summary: dict = {"code": code}
    with contextlib.suppress(TunedeckError):
        card = ModelCard.read(root / "models")
        summary.update(data_version=card.data_version, model_sha256=card.sha256)
    with contextlib.suppress(OSError, ValueError):
        summary.update(json.loads((root / "eval/metrics.json").read_text()))
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
    create_markdown_artifact(markdown=f"| | |\n|---|---|\n{rows}\n", key="versions", description="data/model versions")
    return summary


def tag_versions(versions: dict) -> None:
    """The run's data and model versions as tags (data:<md5>, model:<sha256>, 12 digits), as a stage's run has."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    tags = [f"{kind}:{versions[key][:12]}" for kind, key in (("data", "data_version"), ("model", "model_sha256"))
            if versions.get(key)]
    if tags and flow_run.id:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(flow_run.id).tags or []
            client.update_flow_run(flow_run.id, tags=sorted({*current, *tags}))


def data_changed(status: dict) -> list[str]:
    """The data paths `dvc status --json` reports as new or modified (a stage's changed deps)."""
    changed = []
    for entries in status.values():
        for entry in entries if isinstance(entries, list) else []:
            for path, what in (entry.get("changed deps") or {}).items() if isinstance(entry, dict) else []:
                if what in ("modified", "new", "deleted") and not path.endswith(".py"):
                    changed.append(path)
    return changed


@flow(name="data-watch")
def data_watch(stage: str = "prepare") -> list[str]:
    """Start the pipeline deployment when the data the first stage reads differs from what the last run trained on.

    The last run is the newest completed pipeline run's `data:` tag (runs work in their own
    workspaces, so the clone's dvc.lock does not follow them); before any, the clone's dvc.lock.
    """
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    source, current = data_version_now(stage)
    last = last_trained_data()
    if last is not None:
        changed = [source] if not current.startswith(last) else []
    else:  # not --quiet: it silences the JSON too. DVC's warnings share the stream, so take the JSON line.
        out = dvc("status", stage, "--json")
        changed = data_changed(next((json.loads(line) for line in out.splitlines() if line.startswith("{")), {}))
    if changed:
        logger.info("data changed (%s): starting pipeline/pipeline", ", ".join(changed))
        run_deployment("pipeline/pipeline", timeout=0)
    else:
        logger.info("data unchanged")
    return changed


def data_version_now(stage: str) -> tuple[str, str]:
    """(data.source, its DVC md5 now) for the stage's first dependency; DVC's state cache spares rehashing."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        dep = repo.stage.collect(stage)[0].deps[0]
        return dep.def_path, dep.get_hash().value or ""


def last_trained_data() -> str | None:
    """The 12-digit data version of the newest completed pipeline run, None when no run has one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    completed = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])))
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
                                     flow_run_filter=completed, sort=FlowRunSort.END_TIME_DESC, limit=20)
    for run in runs:
        tag = next((t for t in run.tags or [] if t.startswith("data:")), None)
        if tag:
            return tag.removeprefix("data:")
    return None
