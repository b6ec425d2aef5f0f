"""The runs list: one row per flow run, with its state, stage, progress, GPUs and versions."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from tui.format import duration, eta, metric, short, state_text
from tui.providers.models import Progress, Run
from tui.widgets.keyed_table import KeyedTable

COLUMNS = [("STATE", "state", 9), ("NAME", "name", 18), ("STAGE", "stage", 8), ("DEPLOYMENT", "deployment", 23),
           ("DURATION", "duration", 8), ("EPOCH", "epoch", 7), ("ETA", "eta", 6), ("VAL ACC", "acc", 7),
           ("GPUS", "gpus", 5), ("DATA", "data", 8), ("MODEL", "model", 8)]


class RunsTable(KeyedTable):
    """Runs of the current page; Enter opens the detail view."""

    @dataclass
    class RunSelected(Message):
        """The user chose a run (Enter)."""

        run: Run

    def __init__(self, **kwargs) -> None:
        super().__init__(COLUMNS, drop_order=("model", "data", "deployment", "duration", "eta"), **kwargs)
        self.runs: dict[str, Run] = {}
        """The runs on screen, by id."""

    def show_runs(self, runs: tuple[Run, ...], gpus: dict[str, tuple[int, ...]], progress: Progress | None,
                  progress_run: str | None) -> None:
        """Show runs; gpus maps run id → GPU indices; progress belongs to run id progress_run."""
        self.runs = {r.id: r for r in runs}
        rows = []
        for r in runs:
            mine = r.progress or (progress if r.id == progress_run else None)
            epoch, left = eta(r, mine)
            rows.append((r.id, (state_text(r.state, r.state_name or r.state.title()), r.name, r.current_stage, r.deployment or "",
                                duration(r.duration_s), epoch, left, metric(mine, r), ",".join(map(str, gpus.get(r.id, ()) or (r.gpus if r.state == "RUNNING" else ()))),
                                short(r.data_version), short(r.model_version))))
        self.show(rows)

    @property
    def current_run(self) -> Run | None:
        """The run under the cursor."""
        key = self.current_key
        return self.runs.get(key) if key else None

    def on_data_table_row_selected(self, event: KeyedTable.RowSelected) -> None:
        """Enter on a row: tell the screen which run."""
        event.stop()
        run = self.current_run
        if run:
            self.post_message(self.RunSelected(run))
