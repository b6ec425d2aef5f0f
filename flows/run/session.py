"""The run's DVC session (flows.gateways.dvc.session) and each DVC stage as a Prefect task through it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from prefect import get_run_logger, task

from flows.contracts import StageProgress, stage_labels
from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.gateways.dvc.session import DvcSession
from flows.run.labels import label_run

_SESSION: DvcSession | None = None  # the run's DVC helper (flows.gateways.dvc.session), while a flow runs


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
    """Reproduce one DVC stage, its output streamed into this run's log, its progress into the run's labels.
    env: the slot's variables and the stage's settings (stage_env)."""
    watch = StageWatch(stage, get_run_logger())
    dvc_session().repro(stage, env, on_line=watch.line)
    return stage


def stage_env(slot: dict[str, str], settings: Settings) -> dict[str, str]:
    """What a stage of this run runs with: the slot's variables (its GPU, its threads) and the run's settings, with
    no flow run of its own (the run's is its), its progress as marked lines for StageWatch, and the run's warm server
    or none (never its workspace's own: flows.stages.warm)."""
    from flows.stages.warm import OFF

    return {**slot, **settings.but(prefect="off", progress="lines", warm=settings.warm or OFF).env()}


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
