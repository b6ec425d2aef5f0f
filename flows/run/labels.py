"""A run's labels on the Prefect server: what any host's dashboard reads of it (stage, epoch k/N, metrics, ETA, scores).

Published from a thread of its own (Labeller), in order, so the stages never wait on the server.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from pathlib import Path

from prefect import get_run_logger
from prefect.runtime import flow_run, task_run

from flows.contracts import LABEL, StageProgress, eval_scores
from flows.gateways import prefect_api


class Labeller:
    """Publishes this flow run's labels (and a progress artifact for Prefect's UI) from a thread of its own,
    in order: the stages never wait on the server.

    One client for the run's life; flush() at the end sends what is queued. A server hiccup
    loses a progress update (the log has every epoch), never the run; an update put with
    must=True (the test scores) is tried again until it lands or must_within runs out.
    """

    def __init__(self, run_id: str, must_within: float = 60.0) -> None:
        self.run_id = run_id
        self.must_within = must_within
        self.queue: queue.Queue[tuple | None] = queue.Queue()
        self.failed = 0
        self.lost_musts = 0
        self.artifacts: dict[str, object] = {}  # progress artifact key -> its id
        self.thread = threading.Thread(target=self._send, name="tunedeck-labels", daemon=True)
        self.thread.start()

    def _send(self) -> None:
        with prefect_api.session() as api:
            while (item := self.queue.get()) is not None:
                *update, must = item
                deadline = time.monotonic() + self.must_within
                while True:
                    try:
                        self._one(api, *update)
                        break
                    except Exception:  # noqa: BLE001 - the server is busy or away: a must again, the rest dropped
                        if not must:
                            self.failed += 1
                            break
                        if time.monotonic() > deadline:
                            self.lost_musts += 1
                            break
                        time.sleep(1.0)

    def _one(self, api: prefect_api.Session, labels: dict, progress: tuple[str, float] | None, task_run_id) -> None:
        api.set_labels(self.run_id, labels)
        if progress is None:
            return
        key, percent = progress
        self.artifacts[key] = api.progress(self.run_id, key, percent, self.artifacts.get(key), task_run_id)

    def put(self, labels: dict, progress: tuple[str, float] | None, task_run_id, must: bool = False) -> None:
        self.queue.put((labels, progress, task_run_id, must))

    def flush(self, timeout: float) -> None:
        self.queue.put(None)
        self.thread.join(timeout)


_LABELLER: Labeller | None = None


def label_run(labels: dict, progress: tuple[str, float] | None = None, must: bool = False) -> None:
    """Merge labels into this flow run's soon, in the background (outside a flow run: nothing).

    progress: (artifact key, percent done) for a progress artifact in Prefect's UI; must: tried
    again until it lands (within the labeller's must_within), and flush_labels() waits for it.
    """
    global _LABELLER

    if not flow_run.id:
        return
    if _LABELLER is None or _LABELLER.run_id != flow_run.id or not _LABELLER.thread.is_alive():
        _LABELLER = Labeller(flow_run.id)
    _LABELLER.put(labels, progress, task_run.id, must)


def flush_labels() -> None:
    """Send the labels still queued (the run is ending): waits for a must update's last try."""
    global _LABELLER
    if _LABELLER is not None:
        _LABELLER.flush(timeout=_LABELLER.must_within + 30.0)
        if _LABELLER.failed:
            get_run_logger().warning(f"{_LABELLER.failed} progress update(s) did not reach the server; the log has them")
        if _LABELLER.lost_musts or _LABELLER.thread.is_alive():
            get_run_logger().warning("the test scores did not reach the run's labels (the server was busy or away); "
                                     "eval/metrics.json in the run's DVC experiment has them")
        _LABELLER = None


def label_scores(ws: Path) -> None:
    """The test scores of the run's model (eval/metrics.json) on its labels, for sure: the evaluate stage's own line
    reaches them in the background as one progress update, which a busy server may drop (a pipeline run ended
    without them in CI on d67e283, two workers), and a stage DVC skipped as up to date sent none. Queued as a must
    update: the run goes on (push, gate, experiment) while it is sent, and its end waits for it. (Sent in the
    foreground, it held every run 2 s: the server's SQLite answers the first try 503 right after a stage ends,
    and Prefect's client backs off; measured with PREFECT_LOGGING_LEVEL=DEBUG, 2026-12-07.)"""
    try:
        scores = eval_scores(json.loads((ws / "eval/metrics.json").read_text()))
    except (OSError, ValueError):
        return
    if scores:
        label_run(StageProgress.scores("evaluate", scores).labels(), must=True)


def label_cost(ws: Path) -> None:
    """The training's energy, device-hours and cost (the train stage wrote them to dvclive/metrics.json:
    flows.gateways.power) on the run's labels, e.g. tunedeck.energy.gpu_wh, tunedeck.cost.total ("unknown" where a
    counter could not be read); a train stage DVC found up to date: the figures of the training that made its model.
    And the throughput of a training this run did (flows.stages.train.throughput), with the model, image size and
    batch it was measured at: tunedeck.throughput.s_per_image_epoch, ... (what `tunedeck plan` reads)."""
    import yaml

    from flows.core.paths import THROUGHPUT

    labels = {}
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((ws / "dvclive/metrics.json").read_text())
        labels = {f"{LABEL}{group}.{name}": value for group in ("energy", "cost")
                  for name, value in (summary.get(group) or {}).items()}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        measured = json.loads((ws / THROUGHPUT).read_text())
        params = yaml.safe_load((ws / "params.yaml").read_text())
        measured.update(model=str(params["model"]["name"]), image_size=int(params["data"]["image_size"]),
                        batch=int(params["train"]["batch_size"]))
        labels.update({f"{LABEL}throughput.{name}": value for name, value in measured.items()})
    if labels:
        label_run(labels, must=True)
