"""What every stage entry point shares: logging, params, the flow wrapper, clean failures."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.core.params import Params, load_params
from flows.core.paths import PARAMS
from flows.stages import warm as warm_stages


def setup_logging() -> None:
    """Plain 'message' lines on stderr for the tunedeck logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tunedeck")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run_main(name: str, work: Callable[[Params, Settings], dict[str, Any]], tags: Callable[[], list[str]] = list,
             warm: bool = True) -> int:
    """Read this process's settings and params.yaml, run work as the flow ``name``; print one sentence and return 2
    on bad input.

    A stage that imports torch (warm=True) is handed to a warm server (flows.stages.warm), which runs it with torch
    already imported (and reads the settings again, at its entry): its pipeline run's, or for a stage of a plain
    `dvc repro`, its project's.
    """
    try:
        settings = Settings.read()
    except TunedeckError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    if warm and (status := warm_stages.hand_over(settings)) is not None:
        return status
    setup_logging()
    try:
        from flows.stages.orchestration import run_stage

        params = load_params(PARAMS)
        summary = run_stage(name, lambda: work(params, settings), params.to_dict(), [f"stage:{name}", *tags()], settings)
    except TunedeckError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; nothing was written past the last complete output.", file=sys.stderr)
        return 130
    logging.getLogger("tunedeck").info("%s done: %s", name, ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def finish(code: int) -> NoReturn:
    """End the stage process with code, at once. Its outputs are written and closed by now; an interpreter that
    imported torch would spend about 0.9 s unwinding its modules (a `dvc repro` of four stages waited 3.5 s on that).
    A warm child ends the same way, through its server (flows.stages.warm): here SystemExit, which the child reports."""
    if warm_stages.CHILD in sys.modules:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
