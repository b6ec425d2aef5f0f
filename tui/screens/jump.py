"""`x`: from a run to the DVC experiment it made (the experiments view does the way back)."""

from __future__ import annotations

from tui.experiment_table import experiment_name
from tui.providers.models import Run


def to_experiment(app, run: Run) -> None:
    """Open the experiments view on the experiment run made, or say why it made none."""
    name = experiment_name(run)
    if name is None:
        app.notify(f"Run {run.name} is the {run.flow} stage of a plain `dvc repro`: it saved no DVC experiment "
                   "(its results are in that project's workspace row).", severity="warning")
    elif run.state in ("SCHEDULED", "PENDING"):
        app.notify(f"Run {run.name} has not started: its experiment '{name}' comes when it runs.", severity="warning")
    else:
        app.open_experiment(name)
