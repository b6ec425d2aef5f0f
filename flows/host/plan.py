"""`tunedeck plan`: where a run of the current params should go, from what past runs measured.

Every training a deployment run finished left its throughput on the run's labels (flows.run.labels.label_cost):
the host and device, the seconds per training image and epoch at a model, image size and batch, the time the stage
spent around the training (building the model, loading the data), and its cost per second (the host's price x the
devices it held). For each host and device that trained this model, the plan predicts a run of the current params
(epochs x training images) and its cost, and picks the cheapest that meets a deadline: `--run` starts the pipeline
deployment on that host (its worker polls a work queue of its own, host-NAME).

The prediction: measured at the same model, image size and batch, the median of those runs; else the same model at
another size, scaled by the pixels per image (a CNN's work grows with them; the batch is taken as it was), and said.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from flows.contracts import LABEL
from flows.core.errors import TunedeckError

PLAN = f"{LABEL}throughput."


def host_queue(host: str) -> str:
    """The work queue only this host's workers poll (beside the pool's default one)."""
    return f"host-{host}"


@dataclass(frozen=True)
class Record:
    """One training a run measured (its labels)."""

    host: str
    device: str
    model: str
    image_size: int
    batch: int
    s_per_image_epoch: float
    overhead_s: float
    images: int
    cost_per_s: float | None  # None: the host had no price

    @classmethod
    def from_labels(cls, labels: dict) -> Record | None:
        """The record a run's labels carry, None when they carry none (or a figure was not read)."""
        try:
            spie, images, epochs = (float(labels[f"{PLAN}{k}"]) for k in ("s_per_image_epoch", "images", "epochs"))
            overhead = float(labels[f"{PLAN}overhead_s"])
            total = labels.get(f"{LABEL}cost.total")
            wall = spie * images * epochs + overhead
            return cls(host=str(labels[f"{LABEL}host"]), device=str(labels[f"{PLAN}device"]),
                       model=str(labels[f"{PLAN}model"]), image_size=int(labels[f"{PLAN}image_size"]),
                       batch=int(labels[f"{PLAN}batch"]), s_per_image_epoch=spie, overhead_s=overhead, images=int(images),
                       cost_per_s=float(total) / wall if isinstance(total, int | float) and wall > 0 else None)
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Job:
    """The run to place: its model, image size, batch, epochs and training images (None: this clone has no prepared
    data, so as many as the recorded runs had)."""

    model: str
    image_size: int
    batch: int
    epochs: int
    images: int | None


@dataclass(frozen=True)
class Option:
    """One host and device for the job: its expected seconds and cost (None: no price), from how many runs, how."""

    host: str
    device: str
    seconds: float
    cost: float | None
    runs: int
    basis: str

    def meets(self, deadline_s: float | None) -> bool:
        return deadline_s is None or self.seconds <= deadline_s


def options(records: list[Record], job: Job) -> list[Option]:
    """Each host and device that trained the job's model, with the job's expected time and cost."""
    found = []
    for host, device in sorted({(r.host, r.device) for r in records if r.model == job.model}):
        mine = [r for r in records if (r.host, r.device, r.model) == (host, device, job.model)]
        exact = [r for r in mine if (r.image_size, r.batch) == (job.image_size, job.batch)]
        used = exact or mine
        scale = [(job.image_size / r.image_size) ** 2 for r in used]
        per = statistics.median(r.s_per_image_epoch * k for r, k in zip(used, scale, strict=True))
        images = job.images or statistics.median(r.images for r in used)
        seconds = statistics.median(r.overhead_s for r in used) + per * images * job.epochs
        rates = [r.cost_per_s for r in used]
        cost = None if None in rates else seconds * statistics.median(rates)  # type: ignore[type-var]
        sizes = sorted({f"{r.image_size} px, batch {r.batch}" for r in used})
        basis = "measured at these params" if exact else f"scaled by pixels from {'; '.join(sizes)}"
        found.append(Option(host, device, seconds, cost, len(used), basis))
    return found


def pick(found: list[Option], deadline_s: float | None) -> Option | None:
    """The cheapest option that meets the deadline (the faster of equal costs); where none has a price, the fastest
    that meets it; None when none meets it."""
    meeting = [o for o in found if o.meets(deadline_s)]
    priced = [o for o in meeting if o.cost is not None]
    if priced:
        return min(priced, key=lambda o: (o.cost, o.seconds))
    return min(meeting, key=lambda o: o.seconds) if meeting else None


def ranked(found: list[Option], deadline_s: float | None) -> list[Option]:
    """Those meeting the deadline first, cheapest first (no price after a price), then the rest, fastest first."""
    return sorted(found, key=lambda o: (not o.meets(deadline_s), o.cost is None if o.meets(deadline_s) else 0,
                                        (o.cost or 0.0) if o.meets(deadline_s) else o.seconds, o.seconds))


def current_job(root: Path, overrides: list[str]) -> Job:
    """The job params.yaml (with overrides, as `dvc exp run -S` takes them) describes; its training images from the
    prepared data's manifest, where this clone has one."""
    import yaml

    from flows.core.params import parse_params
    from flows.core.paths import PREPARED
    from flows.core.prepare import load_manifest
    from flows.run.overrides import overridden_text

    params = parse_params(yaml.safe_load(overridden_text(root / "params.yaml", overrides)))
    try:
        images = load_manifest(root / PREPARED).counts.get("train") or None
    except TunedeckError:
        images = None
    return Job(params.model.name, params.data.image_size, params.train.batch_size, params.train.epochs, images)


def recorded() -> list[Record]:
    """The records of the server's newest completed runs."""
    from flows.gateways import prefect_api

    done = prefect_api.completed_runs(["pipeline", "experiment"], limit=200)
    return [r for _, labels in done if (r := Record.from_labels(labels)) is not None]


def parse_duration(text: str) -> float:
    """Seconds from 90, 90s, 45m, 2h or 1.5h."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise TunedeckError(f"--deadline {text}: give a duration like 90s, 45m or 2h.")
    return seconds
