"""``python -m flows.stages.reporter``: the Prefect flow run of one stage, run beside the stage's process.

The stage process starts this reporter as a child and goes straight on with its work, so
importing Prefect and opening the flow run happen on another core, at the same time. The
stage streams JSON lines to the reporter's stdin:

  {"name", "api_url", "parameters", "tags"}   first line: which flow run to open
  {"log": text, "level": n}                   a log line of the stage, sent to the run's logs
  {"progress": StageProgress}                 a finished epoch: set as the run's labels (flows.contracts)
  {"done": summary}                           success: the run ends Completed, summary as an artifact
  {"failed": sentence}                        bad input: the run ends Failed with that sentence

If stdin closes with none of the last two (the stage was killed), the run ends Crashed at once.
If the server does not answer when the run ends (it is down, or restarting), the reporter
tells the stage so and stays behind it, setting the run's final state as soon as the server
answers again (for up to SETTLE_S), so no run stays Running after an outage.
A run cancelled from the API (the dashboard, the Prefect UI or CLI) is noticed within
CANCEL_POLL_S: the reporter stops the stage process (SIGTERM; its checkpoints stay, so a later
run resumes) and the run ends Cancelled.
The reporter answers on stdout: {"flow_run_id", "url"} once the run is open, {"final": state}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from typing import Any

from flows.gateways import processes
from flows.gateways.prefect_api import async_session, end_run, healthy

CANCEL_POLL_S = 2.0
SETTLE_S = 900.0  # how long a reporter keeps trying to set a run's final state through an outage
SETTLE_POLL_S = 2.0


def answer(message: dict[str, Any]) -> None:
    """One JSON line to the stage process (ignored if it has gone)."""
    try:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass


def markdown(name: str, summary: dict[str, Any]) -> str:
    """The stage's summary (versions, metrics) as a small markdown table."""
    rows = "\n".join(f"| {key} | {value} |" for key, value in summary.items())
    return f"# {name}\n\n| | |\n|---|---|\n{rows}\n"


def main() -> int:
    """Open the flow run, relay the stage's lines into it, close it with the stage's outcome."""
    stage_pid = os.getppid()  # the stage process that started this reporter
    from flows.contracts import ReporterOpen

    spec = ReporterOpen.model_validate_json(sys.stdin.readline()).model_dump()
    # Prefect reads its settings when first imported: these go into the environment before it is (below)
    os.environ["PREFECT_API_URL"] = spec["api_url"]
    # a server that is down answers nothing for a while: give up on it in seconds (the stage waits
    # for the run's end), then settle() keeps trying behind the stage
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")
    return Reporter(spec, stage_pid).run()


class Reporter:
    """One stage's flow run: opened, fed the stage's lines in order, closed with the stage's outcome.

    run_id, end (the state the run is to end in once the stage is done) and told (the stage was
    told the server is down) are what the run's end is decided from; client is the run's one client.
    """

    def __init__(self, spec: dict[str, Any], stage_pid: int) -> None:
        self.spec, self.name, self.stage_pid = spec, spec["name"], stage_pid
        self.run_id: str | None = None
        self.end = None
        self.told = False
        self.client = None
        self.next_progress = None  # the newest epoch not yet published
        self.progress_task: asyncio.Task | None = None  # the task publishing it

    def run(self) -> int:
        """The flow run, start to end; the process's exit code."""
        from prefect import flow, tags
        from prefect.states import Crashed

        stage = flow(name=self.name, persist_result=False, validate_parameters=False)(self.stage)
        try:
            with tags("tunedeck", "dvc", *self.spec["tags"]):
                state = asyncio.run(stage(self.spec["parameters"], return_state=True))
        except Exception as exc:  # noqa: BLE001 - the server went away while the run was open
            if self.run_id is None:
                raise
            state = Crashed(message=f"the {self.name} stage's reporter failed ({type(exc).__name__})")
        if not state.is_final() or self.told:  # the engine could not tell the server how the run ended
            if not self.told:
                answer({"final": "PENDING"})
            code = settle(self.run_id, self.end or state)
            sys.stderr.flush()
            os._exit(code)  # not Prefect's exit-time log flush: it would retry lines the outage lost, at a server maybe gone again
        answer({"final": state.type.value})
        return 0

    async def stage(self, params: dict[str, Any]) -> Any:
        """The flow's body: announce the run, watch for a cancel, relay the stage's lines until its end."""
        from prefect import get_run_logger
        from prefect.context import get_run_context

        run = get_run_context().flow_run
        self.run_id = str(run.id)
        ui = self.spec["api_url"].removesuffix("/api")
        answer({"flow_run_id": self.run_id, "url": f"{ui}/runs/flow-run/{run.id}", "name": run.name})
        cancelled = asyncio.Event()
        async with async_session() as client:  # one client for the run's life: the cancel watch and every label update
            self.client = client
            watcher = asyncio.create_task(self.watch_for_cancel(cancelled))
            try:
                return await self.relay(get_run_logger(), cancelled)
            finally:
                watcher.cancel()
                if self.progress_task is not None and not self.progress_task.done():
                    self.next_progress = None  # an epoch still waiting is dropped: the run's end comes next
                    with contextlib.suppress(asyncio.TimeoutError, Exception):
                        await asyncio.wait_for(asyncio.shield(self.progress_task), timeout=2)

    async def watch_for_cancel(self, cancelled: asyncio.Event) -> None:
        """A run cancelled from the API: stop the stage process (its checkpoints stay)."""
        while True:
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                current = await self.client.run_state(self.run_id)
            except Exception:  # noqa: BLE001 - a server hiccup: look again next time
                continue
            if current in ("CANCELLING", "CANCELLED"):
                cancelled.set()
                if os.getppid() == self.stage_pid:  # never signal whoever adopted an orphan
                    processes.send(self.stage_pid, signal.SIGTERM)
                return

    async def relay(self, logger, cancelled: asyncio.Event) -> Any:
        """The stage's lines, in order, into the run, until its end (or stdin closes: killed or cancelled)."""
        from prefect.states import Cancelled, Crashed, Failed

        from flows.contracts import reporter_message

        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                if cancelled.is_set():
                    self.end = Cancelled(message=f"cancelled: the {self.name} stage process was stopped (its checkpoints stay)")
                else:
                    self.end = Crashed(message=f"the {self.name} stage process ended before finishing (killed?)")
                self.server_down()
                return self.end
            message = reporter_message(line)
            if "log" in message:
                logger.log(message.get("level", 20), message["log"])
            elif "progress" in message and message["progress"].final:
                # the stage's scores (evaluate's, sent just before it ends) are awaited here, in order, never
                # left to the background: racing the run's end, they were lost in 1 run of 3 on a quiet machine
                # (a labels write beside the summary artifact's took about 2 s, past the end's wait)
                await self.send_labels(message["progress"])
            elif "progress" in message:
                self.publish_progress(message["progress"])
            elif "failed" in message:
                self.end = Failed(message=message["failed"])
                self.server_down()
                return self.end
            elif "done" in message:
                if self.progress_task is not None:  # the newest epoch first: a finished run shows its last epoch k/N
                    with contextlib.suppress(Exception):  # each labels write has its own timeout (send_labels)
                        await asyncio.shield(self.progress_task)
                return await self.done(message["done"])

    async def done(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Success: the run ends Completed, with the stage's summary as an artifact if the server is there."""
        from prefect.artifacts import acreate_markdown_artifact
        from prefect.states import Completed

        self.end = Completed(message=f"the {self.name} stage finished")
        if self.server_down():
            return summary
        try:
            await acreate_markdown_artifact(markdown=markdown(self.name, summary), key=f"{self.name}-summary")
        except Exception:  # noqa: BLE001 - the server went away just now: the run's end matters more
            self.server_down()
        return summary

    def publish_progress(self, raw) -> None:
        """A training epoch's progress as the run's labels, in the background: the relay waits on it only at the
        stage's successful end (a stage forked warm can train a tiny model's epochs and end within a second, and the
        newest epoch, dropped at the end, left its run with no progress at all: CI on c1d743f).

        Only the newest epoch matters, so one waiting replaces another; a server that is down
        loses these updates (the stage's log has every epoch), never the run's end.
        """
        self.next_progress = raw
        if self.progress_task is None or self.progress_task.done():
            self.progress_task = asyncio.create_task(self.send_progress())

    async def send_progress(self) -> None:
        while (latest := self.next_progress) is not None:  # a StageProgress (flows.contracts)
            self.next_progress = None
            await self.send_labels(latest)

    async def send_labels(self, update, timeout: float = 5.0) -> None:
        """The progress's labels on the run; best effort (a server hiccup loses them, never the run)."""
        try:
            await asyncio.wait_for(self.client.set_labels(self.run_id, update.labels()), timeout=timeout)
        except Exception:  # noqa: BLE001 - best effort
            pass

    def server_down(self) -> bool:
        """Whether the server is unreachable now; if so the stage is told at once, not after the engine's retries."""
        if healthy(self.spec["api_url"], timeout=1.0):
            return False
        if not self.told:
            self.told = True
            answer({"final": "PENDING"})
        return True


def settle(run_id: str, state, give_up_after: float = SETTLE_S) -> int:
    """Set the run's final state once the server answers again; the stage has gone on meanwhile."""
    import time

    deadline = time.monotonic() + give_up_after
    while time.monotonic() < deadline:
        try:
            end_run(run_id, state)  # the engine's own retries may have got there first
            print(f"tunedeck reporter: flow run {run_id} ends {state.type.value}, set after an outage", file=sys.stderr)
            return 0
        except Exception:  # noqa: BLE001 - still down: try again
            time.sleep(SETTLE_POLL_S)
    print(f"tunedeck reporter: gave up setting flow run {run_id} to {state.type.value}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
