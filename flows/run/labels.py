"""A run's labels on the Prefect server: what any host's dashboard reads of it (stage, epoch k/N, metrics, ETA, scores).

Published from a thread of its own (Labeller), in order, so the stages never wait on the server.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

from prefect import get_run_logger
from prefect.runtime import flow_run, task_run

from flows.contracts import StageProgress, eval_scores
from flows.gateways import prefect_api


class Labeller:
    """Publishes this flow run's labels (and a progress artifact for Prefect's UI) from a thread of its own,
    in order: the stages never wait on the server.

    One client for the run's life; flush() at the end sends what is queued. A server hiccup
    loses an update (the log has every epoch), never the run.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.queue: queue.Queue[tuple | None] = queue.Queue()
        self.failed = 0
        self.artifacts: dict[str, object] = {}  # progress artifact key -> its id
        self.thread = threading.Thread(target=self._send, name="tunedeck-labels", daemon=True)
        self.thread.start()

    def _send(self) -> None:
        with prefect_api.session() as api:
            while (item := self.queue.get()) is not None:
                try:
                    self._one(api, *item)
                except Exception:  # noqa: BLE001
                    self.failed += 1

    def _one(self, api: prefect_api.Session, labels: dict, progress: tuple[str, float] | None, task_run_id) -> None:
        api.set_labels(self.run_id, labels)
        if progress is None:
            return
        key, percent = progress
        self.artifacts[key] = api.progress(self.run_id, key, percent, self.artifacts.get(key), task_run_id)

    def put(self, labels: dict, progress: tuple[str, float] | None, task_run_id) -> None:
        self.queue.put((labels, progress, task_run_id))

    def flush(self, timeout: float = 30.0) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


_LABELLER: Labeller | None = None


def label_run(labels: dict, progress: tuple[str, float] | None = None) -> None:
    """Merge labels into this flow run's soon, in the background (outside a flow run: nothing).

    progress: (artifact key, percent done) for a progress artifact in Prefect's UI.
    """
    global _LABELLER

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


def label_scores(ws: Path, give_up_after: float = 60.0) -> None:
    """The test scores of the run's model (eval/metrics.json) on its labels, now and for sure: the evaluate stage's own
    line reaches them in the background, which a busy server may drop (a pipeline run ended without them in CI on
    d67e283, two workers), and a stage DVC skipped as up to date sent none. Retried for up to give_up_after seconds."""


    try:
        scores = eval_scores(json.loads((ws / "eval/metrics.json").read_text()))
    except (OSError, ValueError):
        return
    if not scores or not flow_run.id:
        return
    labels = StageProgress.scores("evaluate", scores).labels()
    deadline = time.monotonic() + give_up_after
    while True:
        try:
            prefect_api.set_labels(flow_run.id, labels)
            return
        except Exception as exc:  # noqa: BLE001 - the server is busy or away: again, then say so
            if time.monotonic() > deadline:
                get_run_logger().warning(f"the test scores did not reach the server ({type(exc).__name__}); "
                                         "eval/metrics.json in the run's DVC experiment has them")
                return
            time.sleep(2.0)
