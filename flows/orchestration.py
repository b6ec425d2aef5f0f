"""Run a stage's work as a Prefect flow run when a Prefect server is up, and plainly when not.

Orchestration never makes a stage hang or fail: with no server the stage says so in one line
and runs on. ``TUNEDECK_PREFECT=off`` switches the Prefect layer off (used by benchmarks);
``TUNEDECK_PREFECT=required`` makes a missing server an error instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from flows import server
from flows.core.errors import TunedeckError

SWITCH = "TUNEDECK_PREFECT"
log = logging.getLogger("tunedeck")


def prefect_mode() -> str:
    """'auto' (default), 'off' or 'required', from TUNEDECK_PREFECT."""
    mode = os.environ.get(SWITCH, "auto").strip().lower() or "auto"
    if mode not in ("auto", "off", "required"):
        raise TunedeckError(f"{SWITCH} is '{mode}': use auto, off or required.")
    return mode


def reachable_api() -> str | None:
    """The Prefect API to report to, or None (after saying why) when the stage runs without one."""
    mode = prefect_mode()
    if mode == "off":
        return None
    url = server.api_url()
    if url and server.healthy(url, timeout=1.0):
        return url
    if url:
        why = f"the Prefect server at {url} does not answer"
    else:
        why = "no Prefect server is running"
    if mode == "required":
        raise TunedeckError(f"{why} and {SWITCH}=required: start it with `tunedeck server start`.")
    print(
        f"tunedeck: {why}, so this stage runs without a flow run; "
        "`tunedeck server start` records stages in Prefect.",
        file=sys.stderr,
    )
    return None


def run_stage(name: str, work: Callable[[], dict[str, Any]], parameters: dict[str, Any], tags: list[str]) -> dict[str, Any]:
    """Run work() as the flow ``name`` (a Completed or Failed flow run) or plainly; return its summary.

    ``parameters`` are shown on the flow run; work's summary (versions, metrics) is attached
    to the run as a markdown artifact. A TunedeckError from work fails the run with its
    sentence, without a traceback, and is raised again here.
    """
    url = reachable_api()
    if url is None:
        return work()
    os.environ["PREFECT_API_URL"] = url
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tunedeck")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    from prefect import flow
    from prefect import tags as prefect_tags
    from prefect.artifacts import acreate_markdown_artifact
    from prefect.states import Failed

    failure: list[TunedeckError] = []

    @flow(name=name, persist_result=False, log_prints=True, validate_parameters=False)
    async def stage(params: dict[str, Any]) -> Any:
        try:
            summary = work()
        except TunedeckError as exc:
            failure.append(exc)
            return Failed(message=str(exc))
        await acreate_markdown_artifact(markdown=_markdown(name, summary), key=f"{name}-summary", description=f"{name} stage")
        return summary

    with prefect_tags("tunedeck", "dvc", *tags):
        state = asyncio.run(stage(parameters, return_state=True))
    if failure:
        raise failure[0]
    return state.result()


def _markdown(name: str, summary: dict[str, Any]) -> str:
    rows = "\n".join(f"| {key} | {value} |" for key, value in summary.items())
    return f"# {name}\n\n| | |\n|---|---|\n{rows}\n"
