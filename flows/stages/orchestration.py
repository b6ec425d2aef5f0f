"""Run a stage's work as a Prefect flow run when a Prefect server is up, and plainly when not.

Orchestration never makes a stage hang or fail: with no server the stage says so in one line
and runs on. The process's prefect setting (``TUNEDECK_PREFECT=off``) switches the Prefect layer off
(used by benchmarks); ``required`` makes a missing server an error instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# at the top, not in the SIGTERM handler below: a stop that came while the stage itself was importing psutil
# (dvclive does) found the module half-initialised there and died on psutil.Error (CI on 0097279, seed 25545)
import psutil

from flows.contracts import ReporterAnswer, ReporterOpen, RunFile, StageProgress
from flows.contracts.settings import Settings, variable
from flows.core.errors import TunedeckError
from flows.gateways import prefect_api, processes

log = logging.getLogger("tunedeck")
_reporter: Reporter | None = None  # the reporter of the stage running in this process, if any


def report_progress(progress: StageProgress, settings: Settings) -> None:
    """A training stage's progress, to where it is watched from: its flow run's labels, by one of two ways.

    Under a pipeline run (the progress setting is "lines") it is a marked stdout line, which the pipeline
    turns into its own run's labels; under a stage's own flow run, a message to its reporter.
    """
    if settings.progress == "lines":
        print(progress.line(), flush=True)
    elif _reporter is not None:
        _reporter.send({"progress": progress.model_dump(mode="json")})


def reachable_api(settings: Settings) -> str | None:
    """The Prefect API to report to, or None (after saying why) when the stage runs without one."""
    mode = settings.prefect
    if mode == "off":
        return None
    url = prefect_api.api_url()
    if url and prefect_api.healthy(url, timeout=1.0):
        return url
    if url:
        why = f"the Prefect server at {url} does not answer"
    else:
        why = "no Prefect server is running"
    if mode == "required":
        raise TunedeckError(f"{why} and {variable('prefect')}=required: start it with `tunedeck server start`.")
    print(
        f"tunedeck: {why}, so this stage runs without a flow run; "
        "`tunedeck server start` records stages in Prefect.",
        file=sys.stderr,
    )
    return None


def run_file(pid: int) -> Path:
    """``.tunedeck/runs/<pid>.json``: the flow run a stage process mirrors, while it runs.

    Stage processes started by ``dvc repro`` have no PREFECT__FLOW_RUN_ID in their environment,
    so this file is how the dashboard joins a GPU process to its flow run.
    """
    return prefect_api.state_dir() / "runs" / f"{pid}.json"


class Reporter:
    """The stage side of ``flows.stages.reporter``: a child process that holds the stage's flow run."""

    def __init__(self, name: str, url: str, parameters: dict[str, Any], tags: list[str]) -> None:
        log_dir = prefect_api.state_dir()
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "reporter.log", "ab") as errors:
            # not tied: it outlives a stage killed by SIGKILL, to mark the stage's run Crashed
            self.proc = processes.spawn([sys.executable, "-m", "flows.stages.reporter"], tie=False,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True)
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, name="reporter-answers", daemon=True).start()
        self.name = name
        self.finishing = False
        self.pid_file: Path | None = None
        self.send(ReporterOpen(name=name, api_url=url, parameters=parameters, tags=tags).model_dump(mode="json"))

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                message = ReporterAnswer.model_validate_json(line).model_dump(exclude_unset=True)
            except ValueError:
                continue
            if "url" in message:
                print(f"prefect: flow run '{message['name']}' at {message['url']}", file=sys.stderr, flush=True)
                self._mark_running(message)
            self.answers.put(message)
        self.answers.put({"final": None})

    def _mark_running(self, message: dict[str, Any]) -> None:
        """Tell the dashboard which flow run this process (and its GPU memory) belongs to."""
        if self.finishing:
            return
        self.pid_file = run_file(os.getpid())
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(RunFile(flow_run_id=message["flow_run_id"], name=message["name"], stage=self.name).model_dump_json())

    def send(self, message: dict[str, Any]) -> None:
        """One JSON line to the reporter; a reporter that has gone is not the stage's problem."""
        try:
            self.proc.stdin.write(json.dumps(message, default=str) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def finish(self, message: dict[str, Any], timeout: float = 20.0) -> str | None:
        """Send the outcome and wait (bounded) until the run has its final state."""
        self.finishing = True
        self.send(message)
        run_file(os.getpid()).unlink(missing_ok=True)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                answer = self.answers.get(timeout=left)
            except queue.Empty:
                break
            if answer.get("final") == "PENDING":
                print("tunedeck: the Prefect server did not answer at the end of this stage; its flow run gets its "
                      "final state as soon as the server is back (the reporter keeps trying for 15 minutes).",
                      file=sys.stderr)
            if "final" in answer:
                return answer["final"]
        print(f"tunedeck: the flow run did not confirm its end within {timeout:.0f} s; see {prefect_api.state_dir() / 'reporter.log'}.", file=sys.stderr)
        return None


class _Forward(logging.Handler):
    """Sends the stage's log records to its flow run."""

    def __init__(self, reporter: Reporter) -> None:
        super().__init__(logging.INFO)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.send({"log": record.getMessage(), "level": record.levelno})


def _stopped(name: str, keep: int, signum: int, frame: Any) -> None:
    """SIGTERM (the reporter does this when the run is cancelled): stop what the stage started, one sentence, exit."""
    print(f"tunedeck: the {name} stage was stopped (a cancel from the dashboard or Prefect, or a kill); "
          "its checkpoints stay, so the next `dvc repro` resumes it.", file=sys.stderr, flush=True)
    stop_children(keep)
    run_file(os.getpid()).unlink(missing_ok=True)
    os._exit(128 + signum)


def stop_children(keep: int, grace_s: float = 10.0) -> None:
    """SIGTERM every process this one started but keep (the reporter), SIGKILL what is left after grace_s.

    A DDP stage runs torchrun, which runs a worker per GPU: exiting alone would leave them
    training on, holding the GPUs the cancel was meant to free.
    """
    try:
        children = [c for c in psutil.Process().children(recursive=True) if c.pid != keep]
    except psutil.Error:
        return
    processes.stop_all(children, grace_s)


def run_stage(name: str, work: Callable[[], dict[str, Any]], parameters: dict[str, Any], tags: list[str],
              settings: Settings) -> dict[str, Any]:
    """Run work() plainly, mirrored by the Prefect flow run ``name`` when a server is up.

    The flow run (opened by a reporter process beside this one) shows ``parameters`` and the
    stage's log, ends Completed with work's summary attached as an artifact, Failed with the
    sentence of a TunedeckError (raised again here), or Crashed if this process dies.
    """
    url = reachable_api(settings)
    if url is None:
        return work()
    global _reporter
    reporter = _reporter = Reporter(name, url, parameters, tags)
    forward = _Forward(reporter)
    logger = logging.getLogger("tunedeck")
    logger.addHandler(forward)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, functools.partial(_stopped, name, reporter.proc.pid))
    try:
        summary = work()
    except TunedeckError as exc:
        reporter.finish({"failed": str(exc)})
        raise
    except BaseException as exc:
        reporter.finish({"failed": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        logger.removeHandler(forward)
        _reporter = None
    reporter.finish({"done": summary})
    return summary
