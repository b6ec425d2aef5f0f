"""`tunedeck plan`: each host's expected time and cost for a run of the current params, and the pick for a deadline
(flows.host.plan); with --run, the pipeline deployment started on the picked host."""

from __future__ import annotations

from pathlib import Path

from flows.core.errors import TunedeckError

PIPELINE = "pipeline/pipeline"


def plan_command(deadline: str | None, overrides: list[str], start: bool, root: Path | None = None) -> int:
    """Print the plan; with start, run the pipeline deployment on the pick. Exit 0, or a TunedeckError."""
    from flows.host import plan
    from flows.host.deploy import reachable
    from tui.format import duration

    deadline_s = plan.parse_duration(deadline) if deadline else None
    job = plan.current_job(root or Path.cwd(), overrides)
    reachable()
    found = plan.options(plan.recorded(), job)
    if not found:
        raise TunedeckError(f"no completed run on the server recorded its throughput with {job.model}: run the pipeline "
                            "deployment on each host once (every deployment run records it), then plan.")
    chosen = plan.pick(found, deadline_s)
    within = f", deadline {duration(deadline_s)}" if deadline_s else ""
    images = f"{job.images} training images" if job.images else "as many training images as the recorded runs had"
    print(f"plan for {job.model} at {job.image_size} px, batch {job.batch}: {job.epochs} epochs of {images}{within}")
    rows = [("", "host", "device", "expected", "cost", "runs", "from")]
    for o in plan.ranked(found, deadline_s):
        late = "" if o.meets(deadline_s) else " (misses the deadline)"
        rows.append((">" if o is chosen else "", o.host, o.device, duration(o.seconds) + late,
                     "no price" if o.cost is None else f"{o.cost:.4g}", str(o.runs), o.basis))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if chosen is None:
        fastest = min(found, key=lambda o: o.seconds)
        raise TunedeckError(f"no host meets the deadline of {duration(deadline_s)}: the fastest, {fastest.host}, needs "
                            f"{duration(fastest.seconds)}; give a later --deadline or fewer train.epochs.")
    why = "the cheapest that meets the deadline" if chosen.cost is not None else "no host has a price: the fastest"
    if not start:
        print(f"pick: {chosen.host} ({why}); --run starts the pipeline deployment there.")
        return 0
    from flows.gateways import prefect_api

    run_id = prefect_api.start_deployment_run(PIPELINE, {"overrides": overrides}, queue=plan.host_queue(chosen.host))
    print(f"pick: {chosen.host} ({why}): started pipeline run {run_id} on its work queue "
          f"{plan.host_queue(chosen.host)}.")
    return 0
