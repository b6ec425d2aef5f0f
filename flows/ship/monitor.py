"""Keep a model fresh: score a batch of new images with the prod model, measure drift against the
reference its evaluate stage saved (eval/reference/), record it, and emit the retrain event when
drift holds for `monitor.consecutive` batches in a row.

Where each result goes:
- monitor/ (dvclive: monitor/metrics.json and monitor/plots/ with monitor/dvc.yaml, so `dvc metrics
  show` and `dvc plots show` find them), and monitor/history.jsonl (one MonitorBatch per batch);
- a `tunedeck.monitor.batch` event per batch (the dashboard of any host reads them back), and the
  `tunedeck.drift.detected` event that the pipeline deployment's trigger (prefect.yaml) turns into
  a retrain, which still has to pass the promotion gate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from flows.contracts import DRIFT_EVENT, MONITOR_EVENT, DriftStatistic, MonitorBatch
from flows.core.errors import TunedeckError
from flows.core.params import Params
from flows.ship.gate import MODEL_CACHE, resolve_model

MONITOR = Path("monitor")
HISTORY = MONITOR / "history.jsonl"
REFERENCE = Path("eval") / "reference"


def reference_for(root: Path, model_path: Path, version: str) -> Path:
    """The reference (eval/reference/) saved with a model: this workspace's when its model is the one
    monitored, else the registry version's own (`dvc get` at its tag)."""
    from flows.contracts import ModelCard
    from flows.core.model_file import sha256
    from flows.gateways.dvc.cli import dvc

    try:
        if ModelCard.read(root / "models").sha256 == sha256(model_path) and (root / REFERENCE).is_dir():
            return root / REFERENCE
    except TunedeckError:
        pass
    cached = root / MODEL_CACHE / f"{version}-reference"
    if not cached.is_dir():
        if version == "file":
            raise TunedeckError(f"{model_path} has no reference to monitor against: monitor the prod model or a registry version.")
        try:
            dvc("get", ".", str(REFERENCE), "--rev", f"model@{version}", "-o", str(cached), cwd=root)
        except TunedeckError:
            raise TunedeckError(f"model {version} has no saved reference (eval/reference): retrain it with this "
                                "version of tunedeck (`dvc repro`) and promote it, then monitor.") from None
    return cached


def decode_batch(images: list[Path], size: int, workers: int = 0) -> tuple[np.ndarray, list[Path], list[str]]:
    """(uint8 N×size×size×3 of the images that decode, their paths, one reason per image that does not):
    predict's decoding (the prepare stage's own, in threads), with no normalising."""
    import os

    from flows.core.predict import decode_ahead

    good, paths, failures = [], [], []
    for path, item in decode_ahead(images, lambda image: image, size, workers or os.cpu_count() or 1, batch_size=64):
        if isinstance(item, str):
            failures.append(f"{path}: {item}")
        else:
            good.append(item)
            paths.append(path)
    arrays = np.stack(good) if good else np.empty((0, size, size, 3), dtype=np.uint8)
    return arrays, paths, failures


def labels_of(folder: Path, paths: list[Path], classes: list[str]) -> np.ndarray | None:
    """Labels when the batch comes in one sub-folder per class (named as the model's classes); else None."""
    index = {name: i for i, name in enumerate(classes)}
    parents = [p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None for p in paths]
    if not parents or any(parent not in index for parent in parents):
        return None
    return np.array([index[parent] for parent in parents], dtype=np.int64)


def read_history(root: Path) -> list[MonitorBatch]:
    """Every batch monitored in this clone, oldest first (a damaged line is skipped)."""
    found = []
    try:
        lines = (root / HISTORY).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            found.append(MonitorBatch.model_validate_json(line))
        except ValueError:
            continue
    return found


def streak_after(history: list[MonitorBatch], counted: bool, version: str) -> int:
    """Batches in a row on this model version that count toward a retrain, the new one (counted or not) included."""
    if not counted:
        return 0
    streak = 1
    for batch in reversed(history):
        if not (batch.drifted if batch.counted is None else batch.counted) or batch.model_version != version:
            break
        streak += 1
    return streak


def harm(estimated: dict, reference_accuracy: float | None, monitor) -> bool | None:
    """Whether the batch's estimated accuracy (its interval's upper end) fell below the reference's by more than
    monitor.estimated_drop; None when there is no estimate or no measured reference to compare with."""
    estimate = estimated.get(monitor.estimator)
    if estimate is None or reference_accuracy is None:
        return None
    return estimate.high < reference_accuracy - monitor.estimated_drop


def counts(trigger: str, drifted: bool, harmful: bool | None) -> bool:
    """Whether a batch counts toward a retrain: drift, an estimated drop, or both (no estimate: drift decides)."""
    if trigger == "drift" or harmful is None:
        return drifted
    return bool(harmful) if trigger == "estimated_drop" else drifted and bool(harmful)


def monitor_batch(root: Path, params: Params, folder: Path, device: str | None = None, api_url: str | None = None,
                  host_name: str = "") -> MonitorBatch:
    """Score folder with the prod model, measure drift, record it, and emit the events (when a server is given);
    host_name: the process's host setting."""
    from flows.core.augment import Normalizer
    from flows.core.devices import resolve_device
    from flows.core.drift import Reference, assess, features_and_probs
    from flows.core.model_file import load_model
    from flows.core.predict import list_images
    from flows.gateways.gpus import host

    model_path, version = resolve_model("prod", root)
    reference = Reference.load(reference_for(root, model_path, version))
    dev = resolve_device(device or params.base.device)
    model, meta = load_model(model_path, dev)
    images = list_images(Path(folder))
    arrays, paths, failures = decode_batch(images, meta.image_size, params.predict.workers)
    for reason in failures[:3]:
        print(f"monitor: skipped {reason}", file=sys.stderr)
    features, probs = features_and_probs(model, Normalizer(meta.mean, meta.std, dev), arrays, params.predict.batch_size,
                                         meta.temperature)
    labels = labels_of(Path(folder), paths, meta.classes)
    report = assess(reference, features, probs, labels, params.monitor)
    history = read_history(root)
    found = estimates(reference, probs, labels)
    harmful = harm(found.get("estimated_accuracy", {}), reference.accuracy, params.monitor)
    counted = counts(params.monitor.trigger, report.drifted, harmful)
    streak = streak_after(history, counted, version)
    batch = MonitorBatch(host=host(host_name), folder=str(folder), model_version=version, n_images=len(paths), failures=len(failures),
                         drifted=report.drifted, streak=streak, triggered=counted and streak == params.monitor.consecutive,
                         statistics=[DriftStatistic(name=s.name, value=float(s.value), threshold=float(s.threshold),
                                                    flagged=s.flagged, direction=s.direction) for s in report.statistics],
                         reference_accuracy=reference.accuracy, estimator=params.monitor.estimator, harmful=harmful,
                         counted=counted, **found)
    record(root, batch, len(history))
    if api_url:
        post_event(api_url, MONITOR_EVENT, version, batch.model_dump(mode="json"))
        if batch.triggered:
            post_event(api_url, DRIFT_EVENT, version, {"summary": summary(batch), "batch": batch.model_dump(mode="json")})
    return batch


def estimates(reference, probs: np.ndarray, labels: np.ndarray | None) -> dict:
    """The batch's label-free accuracy estimates and class priors (a reference saved before they existed has no
    labelled probabilities to fit them on: none), and its measured accuracy when it came labelled."""
    from flows.contracts import Estimated
    from flows.core.estimate import label_free

    out: dict = {}
    if labels is not None and len(labels) == len(probs) and len(probs):
        out["accuracy"] = float((probs.argmax(axis=1) == labels).mean())
    if reference.probs is None or reference.labels is None or not len(probs):
        return out
    accuracy, priors = label_free(reference.probs, reference.labels, probs)
    out["estimated_accuracy"] = {k: Estimated(value=v.value, low=v.low, high=v.high) for k, v in accuracy.items()}
    out["priors"] = {c: Estimated(value=v.value, low=v.low, high=v.high) for c, v in zip(reference.classes, priors, strict=True)}
    return out


def summary(batch: MonitorBatch) -> str:
    """One line: the verdict and the statistics that crossed their thresholds."""
    flagged = [f"{s.name} {s.value:.3g} ({s.direction} {s.threshold:g})" for s in batch.statistics if s.flagged]
    state = f"drift ({', '.join(flagged)})" if batch.drifted else "no drift"
    if batch.harmful:
        state += f"; {harm_summary(batch)}"
    tail = f"; {batch.streak} in a row" if batch.streak else ""
    return f"{batch.n_images} images vs {batch.model_version}'s reference: {state}{tail}" + (
        "; retrain event emitted" if batch.triggered else "")


def estimator_errors(history: list[MonitorBatch]) -> dict[str, list[float]]:
    """Each estimator's signed error (estimate − measured accuracy, in points) on every batch that came labelled."""
    errors: dict[str, list[float]] = {}
    for batch in history:
        if batch.accuracy is None:
            continue
        for name, estimate in batch.estimated_accuracy.items():
            errors.setdefault(name, []).append(100.0 * (estimate.value - batch.accuracy))
    return errors


def errors_summary(history: list[MonitorBatch]) -> str | None:
    """One line: how far each estimator has been from the truth on this clone's labelled batches (None: none yet)."""
    errors = estimator_errors(history)
    if not errors:
        return None
    n = max(len(e) for e in errors.values())
    parts = ", ".join(f"{name} {np.mean(np.abs(e)):.1f} points (bias {np.mean(e):+.1f})" for name, e in errors.items())
    return f"estimates against the measured accuracy over {n} labelled batch{'es' if n != 1 else ''}: {parts}"


def errors_table(history: list[MonitorBatch]) -> str:
    """The estimators' errors on this clone's labelled batches as a markdown table (`tunedeck monitor --errors`)."""
    errors = estimator_errors(history)
    if not errors:
        return ("no labelled batch yet: monitor a folder with one sub-folder per class and the monitor measures its "
                "accuracy beside the estimates.")
    rows = ["| estimator | labelled batches | mean abs. error (points) | bias (points) | worst (points) |",
            "|---|---:|---:|---:|---:|"]
    for name, e in errors.items():
        worst = max(e, key=abs)
        rows.append(f"| {name} | {len(e)} | {np.mean(np.abs(e)):.2f} | {np.mean(e):+.2f} | {worst:+.2f} |")
    return "\n".join(rows)


def harm_summary(batch: MonitorBatch) -> str:
    """The estimated drop that counts as harm, in words: the estimate the trigger read against prod's held-out accuracy."""
    name, estimate = next(((k, e) for k, e in batch.estimated_accuracy.items() if k == batch.estimator), (None, None))
    if estimate is None or batch.reference_accuracy is None:
        return "estimated accuracy drop"
    return (f"estimated accuracy drop ({name} {estimate.value:.1%} [{estimate.low:.1%}, {estimate.high:.1%}] against "
            f"{batch.reference_accuracy:.1%} held out)")


def estimate_summary(batch: MonitorBatch) -> str:
    """One line: the batch's accuracy estimated without labels (and measured, when it came labelled)."""
    if not batch.estimated_accuracy:
        return ("no label-free estimate: the model's reference predates them (retrain it to save its held-out "
                "probabilities)" + (f"; measured accuracy {batch.accuracy:.1%}" if batch.accuracy is not None else ""))
    guesses = ", ".join(f"{name} {e.value:.1%} [{e.low:.1%}, {e.high:.1%}]" for name, e in batch.estimated_accuracy.items())
    held_out = f" (held-out {batch.reference_accuracy:.1%})" if batch.reference_accuracy is not None else ""
    measured = f"; measured {batch.accuracy:.1%}" if batch.accuracy is not None else ""
    return f"estimated accuracy without labels: {guesses}{held_out}{measured}"


def record(root: Path, batch: MonitorBatch, step: int) -> None:
    """The batch in monitor/history.jsonl and as dvclive metrics (monitor/metrics.json, plots, dvc.yaml)."""
    from dvclive import Live

    (root / MONITOR).mkdir(parents=True, exist_ok=True)
    with open(root / HISTORY, "a") as handle:
        handle.write(batch.model_dump_json() + "\n")
    with Live(str(root / MONITOR), resume=True, save_dvc_exp=False, report=None) as live:
        live.step = step
        for stat in batch.statistics:
            live.log_metric(f"drift/{stat.name}", stat.value)
        live.log_metric("drifted", int(batch.drifted))
        live.log_metric("streak", batch.streak)
        live.log_metric("n_images", batch.n_images)
        for name, estimate in batch.estimated_accuracy.items():
            live.log_metric(f"estimated_accuracy/{name}", estimate.value)
        if batch.accuracy is not None:
            live.log_metric("accuracy", batch.accuracy)
    (root / MONITOR / "last.json").write_text(json.dumps(batch.model_dump(mode="json"), indent=2))


def post_event(api_url: str, name: str, version: str, payload: dict) -> None:
    """One Prefect event about the model version; a server that does not take it is one line, not fatal."""
    import httpx

    from flows.gateways import prefect_api

    try:
        with prefect_api.rest(timeout=10) as client:
            prefect_api.post_events(client, api_url, [prefect_api.event(name, f"tunedeck.model.{version}",
                                                                        f"model {version}", payload)])
    except httpx.HTTPError as exc:
        print(f"monitor: the Prefect server at {api_url} did not take the {name} event ({exc}); "
              "the batch is recorded in monitor/ all the same.", file=sys.stderr)
