"""The shape of a flow run, as the dashboard sees it: what the fakes must share with real runs.

A shape is what a screen depends on, not the values: the flow's name, whether a deployment
started it, the kinds of its tags (``data:``, ``stage:``…), and which labels it carries (the
stage, the progress with its metric names and ETA, the host and GPUs). ``recorded.json`` holds
runs recorded from a real server (bench/record_fakes.py); the demo's fakes are built from them,
and tests hold both the fakes and fresh real runs to these shapes.

``recorded.json`` is only ever written by the recorder, through serialise(): tests/tui/test_fakes.py
checks that the committed file is exactly serialise() of itself, so a field added by hand (or one the
providers' dataclasses no longer have) fails there, and the field belongs in the recorder instead.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from functools import cache
from pathlib import Path
from typing import Any

from tui.providers.models import FINAL_STATES, Progress, RemoteHost, Run, RunDetail, build

RECORDED = Path(__file__).with_name("recorded.json")


def shape(run: Run) -> dict[str, Any]:
    """What the dashboard relies on in a run, values left out."""
    progress = run.progress
    return {
        "flow": run.flow, "deployment": run.deployment is not None,
        "tags": sorted({t.split(":", 1)[0] + (":" if ":" in t else "") for t in run.tags}),
        "stage": run.stage is not None, "host": run.host is not None, "gpus": bool(run.gpus),
        "progress": None if progress is None else {
            "metrics": sorted(k for k, _ in progress.metrics), "epochs": progress.epochs is not None,
            "eta": progress.eta_s is not None and run.state == "RUNNING"},
        "scores": sorted(k for k, _ in run.scores),
        # which figures it has (energy, cost), not which parts: a worker without a price records no cost/total
        "cost": sorted({k.split("/")[0] for k, _ in run.cost}),
    }


def kind(run: Run) -> str:
    """Which recorded run a run is compared with: its flow, and whether it is still running."""
    return f"{run.flow}:{'running' if run.state not in FINAL_STATES else 'final'}"


@cache
def recorded() -> dict[str, Any]:
    """The recording: {"runs": [Run as a dict], "hosts": [RemoteHost as a dict]}."""
    return json.loads(RECORDED.read_text())


def canonical(record: dict[str, Any]) -> dict[str, Any]:
    """The recording with every run, host and detail rebuilt as the providers' dataclasses and written back:
    a key those dataclasses lack is dropped, one they have is filled in, and the keys come in their order."""
    return {"about": record["about"], "runs": [asdict(build(Run, r)) for r in record["runs"]],
            "hosts": [asdict(build(RemoteHost, h)) for h in record["hosts"]],
            "detail": asdict(build(RunDetail, record["detail"]))}


def serialise(record: dict[str, Any]) -> str:
    """recorded.json's text: the canonical recording, one-space indents, ending in a newline."""
    return json.dumps(canonical(record), indent=1) + "\n"


@cache
def templates() -> dict[str, Run]:
    """The recorded runs by kind(): one real run of each kind, to build fakes from."""
    found: dict[str, Run] = {}
    for raw in recorded()["runs"]:
        run = build(Run, raw)
        run = replace(run, scores=tuple(tuple(s) for s in run.scores), cost=tuple(tuple(c) for c in run.cost))
        if run.progress is not None:
            run = _with_progress(run, build(Progress, raw["progress"]))
        found.setdefault(kind(run), run)
    return found


def _with_progress(run: Run, progress: Progress) -> Run:
    return replace(run, progress=replace(progress, metrics=tuple(tuple(m) for m in progress.metrics)))


def fits(run: Run, template: Run) -> bool:
    """Whether a run has its template's shape; a run that ended early (failed, cancelled) may lack parts of it."""
    mine, real = shape(run), shape(template)
    if run.state in ("COMPLETED", "RUNNING") or run.state == template.state:
        return mine == real
    return (mine["flow"], mine["deployment"]) == (real["flow"], real["deployment"]) and set(mine["tags"]) <= set(real["tags"]) \
        and all(not mine[k] or real[k] for k in ("stage", "host", "gpus")) \
        and (mine["progress"] is None or mine["progress"] == real["progress"]) and set(mine["scores"]) <= set(real["scores"]) \
        and set(mine["cost"]) <= set(real["cost"])
