"""The GPU ↔ run join as the screen needs it: GPUs of each run, and which running run shows dvclive progress."""

from __future__ import annotations

from tui.providers.models import Run, Telemetry


def gpus_by_run(telemetry: Telemetry | None) -> dict[str, tuple[int, ...]]:
    """Flow run id → the indices of the GPUs its processes hold memory on."""
    found: dict[str, list[int]] = {}
    for gpu in telemetry.gpus if telemetry else ():
        for proc in gpu.processes:
            if proc.flow_run_id and gpu.index not in found.setdefault(proc.flow_run_id, []):
                found[proc.flow_run_id].append(gpu.index)
    return {k: tuple(v) for k, v in found.items()}


def progress_owner(running: tuple[Run, ...], local: dict[str, tuple[int, ...]]) -> str | None:
    """The run this project's dvclive files belong to: a running train run on this host's GPUs, else the newest.

    Only runs that publish no progress of their own (labels) are candidates.
    """
    trains = [r for r in running if r.state == "RUNNING" and r.flow == "train" and r.progress is None]
    on_host = [r for r in trains if r.id in local]
    pick = on_host or trains
    return max(pick, key=lambda r: r.start or 0).id if pick else None
