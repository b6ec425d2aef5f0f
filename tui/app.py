"""The dashboard (placeholder until the dashboard issue lands)."""

from __future__ import annotations

import sys


def run_dashboard() -> int:
    """Say plainly that the dashboard is not here yet, and where to look meanwhile."""
    print(
        "tunedeck dash: the dashboard is not built yet; meanwhile `prefect flow-run ls` lists the "
        "stage runs and `dvc exp show` the experiments.",
        file=sys.stderr,
    )
    return 1
