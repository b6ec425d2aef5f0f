"""The Prefect flows deployments run: the DVC pipeline stage by stage, and an ad-hoc experiment.

Each DVC stage is a Prefect task (`dvc repro --single-item <stage>`) in dvc.yaml's order, with
retries and the stage's DVC lock entry as its cache key: a retry or re-run skips finished
stages, and the train stage resumes from its checkpoint. The run holds a GPU slot (a Prefect
global concurrency limit of 1 per GPU) for its whole length, and pins the GPU with
CUDA_VISIBLE_DEVICES.
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
from prefect.concurrency.sync import concurrency

from flows.core.errors import TunedeckError
from flows.dag import stage_order
from flows.dvc_cli import dvc, sync
from flows.dvc_session import DvcSession
from flows.gpus import gpu_states, slot_name
from flows.overrides import apply_overrides, overridden_text

LEASE_SECONDS = 60  # the shortest lease Prefect allows: a killed run's GPU slot frees within about a minute


_SESSION: DvcSession | None = None  # the run's DVC helper (flows.dvc_session), while a flow runs


def dvc_session() -> DvcSession:
    global _SESSION
    if _SESSION is None:
        _SESSION = DvcSession().start()
    return _SESSION


@contextlib.contextmanager
def open_session() -> Iterator[DvcSession]:
    """Start the DVC helper now (it imports DVC while the run gets its slot) and stop it at the end."""
    global _SESSION
    _SESSION = DvcSession().start()
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
    """Reproduce one DVC stage, its output streamed into this run's log."""
    logger = get_run_logger()
    dvc_session().repro(stage, {**env, "TUNEDECK_PREFECT": "off"}, on_line=logger.info)
    return stage


@contextlib.contextmanager
def device_slot(poll: float = 5.0) -> Iterator[dict[str, str]]:
    """Hold a free GPU of this worker (TUNEDECK_GPUS) for the run, or the host's CPU slot."""
    logger = get_run_logger()
    allowed = os.environ.get("TUNEDECK_GPUS")
    if not allowed:
        with concurrency(slot_name(None), occupy=1, strict=False, lease_duration=LEASE_SECONDS):
            yield {}
        return
    wanted = [int(i) for i in allowed.split(",") if i.strip()]
    waited = False
    while True:
        for gpu in [g.index for g in gpu_states() if g.free and g.index in wanted]:
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(
                    concurrency(slot_name(gpu), occupy=1, timeout_seconds=1, strict=True, lease_duration=LEASE_SECONDS)
                )
            except TimeoutError:
                continue
            with stack:
                logger.info("holding GPU %d (%s)", gpu, slot_name(gpu))
                yield {"CUDA_VISIBLE_DEVICES": str(gpu)}
            return
        if not waited:
            logger.info("all of GPUs %s are busy; waiting for one", allowed)
            waited = True
        time.sleep(poll)


@flow(name="pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, pull: bool = True, push: bool = True) -> dict:
    """dvc pull, every stage of dvc.yaml in order, dvc push; overrides as key=value (dvc exp run -S)."""
    logger = get_run_logger()
    code = code_version()
    logger.info(f"code: {code}")
    with open_session(), device_slot() as env, overridden_params(overrides or []):
        if pull:  # --allow-missing: a first run finds nothing on the remote yet
            sync("pull", "--allow-missing", on_line=logger.info)
        for stage in stage_order():
            run_stage(stage, env)
        if push:
            sync("push", on_line=logger.info)
    return attach_versions(code)


@contextlib.contextmanager
def overridden_params(overrides: list[str]) -> Iterator[None]:
    """params.yaml with the overrides for the run, put back afterwards, even after a crash.

    The original is kept in .tunedeck/params.before-run.yaml while the run holds the change; a
    run that finds it (its predecessor was killed) restores it first.
    """
    params, backup = Path("params.yaml"), Path(".tunedeck/params.before-run.yaml")
    if backup.exists():
        params.write_text(backup.read_text())
        backup.unlink()
    if not overrides:
        yield
        return
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_text(params.read_text())
    try:
        apply_overrides(params, overrides)
        yield
    finally:
        params.write_text(backup.read_text())
        backup.unlink()


@flow(name="experiment", log_prints=True)
def experiment(overrides: list[str] | None = None, name: str | None = None) -> dict:
    """An ad-hoc experiment: `dvc exp run -S ...`, so it appears in `dvc exp show`."""
    logger = get_run_logger()
    code = code_version()
    logger.info(f"code: {code}")
    overridden_text(Path("params.yaml"), overrides or [])  # a bad override fails here, in one sentence
    args = ["exp", "run"] + (["-n", name] if name else [])
    for item in overrides or []:
        args += ["-S", item]
    with device_slot() as env:
        dvc(*args, env={**env, "TUNEDECK_PREFECT": "off"}, on_line=logger.info)
    return attach_versions(code)


def code_version() -> str:
    """`<folder> at <commit>` (with "+changes" when the tree differs from it): the code this run used."""
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return f"{Path.cwd()} (not a git clone)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return f"{Path.cwd()} at {head.stdout.strip()[:12]}" + ("+changes" if dirty.stdout.strip() else "")


def attach_versions(code: str) -> dict:
    """The code, data and model versions (and test metrics) of the finished run, as an artifact."""
    summary: dict = {"code": code}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads(Path("models/model.json").read_text())
        summary.update(data_version=config["data_version"], model_sha256=config["sha256"])
    with contextlib.suppress(OSError, ValueError):
        summary.update(json.loads(Path("eval/metrics.json").read_text()))
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
    create_markdown_artifact(markdown=f"| | |\n|---|---|\n{rows}\n", key="versions", description="data/model versions")
    return summary


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
    """Start the pipeline deployment when the data the first stage reads has changed."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    # not --quiet: it silences the JSON too. DVC's warnings share the stream, so take the JSON line.
    out = dvc("status", stage, "--json")
    status = next((json.loads(line) for line in out.splitlines() if line.startswith("{")), {})
    changed = data_changed(status)
    if changed:
        logger.info("data changed (%s): starting pipeline/pipeline", ", ".join(changed))
        run_deployment("pipeline/pipeline", timeout=0)
    else:
        logger.info("data unchanged")
    return changed
