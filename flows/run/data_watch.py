"""The data-watch flow: start the pipeline deployment when the data its first stage reads has changed."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger

from flows.gateways.dvc.cli import dvc
from flows.gateways.dvc.repo import data_version_now


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


def last_trained_data() -> str | None:
    """The 12-digit data version of the newest completed pipeline run, None when no run has one."""
    from flows.gateways.prefect_api import completed_runs

    for tags, _ in completed_runs(["pipeline"], limit=20):
        tag = next((t for t in tags if t.startswith("data:")), None)
        if tag:
            return tag.removeprefix("data:")
    return None
