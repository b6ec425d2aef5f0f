"""The runs list: one line per flow run, with its state, stage, progress, final scores, GPUs and versions.

A page flip replaces all 100 rows at once: as a DataTable (a cell object per cell, every
row measured) that cost 50-140 ms; as laid-out lines (tui.widgets.line_table) only the rows
on screen are drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding
from textual.message import Message

from tui.format import TEST_ACC, TEST_MACRO_F1, cost, duration, energy, eta, metric, score, short, state_text
from tui.providers.models import Progress, Run
from tui.widgets.keyed_table import columns_that_fit
from tui.widgets.line_table import GAP, Layout, LineTable, row_line

COLUMNS = [("STATE", "state", 9), ("NAME", "name", 16), ("STAGE", "stage", 8), ("DEPLOYMENT", "deployment", 18),
           ("DURATION", "duration", 8), ("EPOCH", "epoch", 7), ("ETA", "eta", 6), ("VAL", "acc", 5),
           ("TEST", "test", 5), ("F1", "f1", 5), ("GPUS", "gpus", 5), ("DATA", "data", 8), ("MODEL", "model", 8),
           ("WH", "energy", 7), ("COST", "cost", 6)]
"""VAL: the val accuracy of the training's last epoch; TEST and F1: the test accuracy and macro-F1 of an evaluated run;
WH and COST: the energy its training drew and what it cost at its host's price per device-hour (the run detail has
the parts)."""
DROP_ORDER = ("cost", "energy", "model", "data", "deployment", "duration", "eta")
"""What a narrow table hides first: at 80 columns the metrics stay, the ETA goes (EPOCH k/N still shows); the
energy and cost need 150."""
NAME_MAX = 28  # a wide terminal gives NAME the room left over, up to this many cells
KEYS = [key for _, key, _ in COLUMNS]


def fitting(width: int) -> Layout:
    """The columns that fit in width cells (DROP_ORDER's dropped first); NAME takes the room left over."""
    kept = columns_that_fit([(key, w) for _, key, w in COLUMNS], DROP_ORDER, width + len(GAP) - 1, len(GAP))
    keep = [(i, w) for i, (_, key, w) in enumerate(COLUMNS) if key in kept]
    used = sum(w for _, w in keep) + len(GAP) * (len(keep) - 1) + 1
    extra = max(0, min(width - used, NAME_MAX - COLUMNS[1][2]))
    return tuple((i, w + extra if i == 1 else w) for i, w in keep)


def header(layout: Layout) -> str:
    """The labels of the columns shown."""
    return GAP.join(COLUMNS[i][0].ljust(width) for i, width in layout).rstrip()


def cells(r: Run, gpus: tuple[int, ...], progress: Progress | None) -> tuple:
    """Every column's cell of one run (progress: its training's, published or from this host's dvclive)."""
    epoch, left = eta(r, progress)
    return (state_text(r.state, r.state_name or r.state.title()), r.name, r.current_stage, r.deployment or "",
            duration(r.duration_s), epoch, left, metric(progress, r), score(r, TEST_ACC), score(r, TEST_MACRO_F1),
            ",".join(map(str, gpus or (r.gpus if r.state == "RUNNING" else ()))), short(r.data_version), short(r.model_version),
            energy(r), cost(r))


class RunsTable(LineTable):
    """Runs of the current page; Enter opens the detail view."""

    ALLOW_MAXIMIZE = True  # `:runs` fills the screen with it
    BINDINGS = [Binding("enter", "select", "open run", show=False)]

    @dataclass
    class RunSelected(Message):
        """The user chose a run (Enter)."""

        run: Run

    def __init__(self, **kwargs) -> None:
        self._layout: Layout = fitting(200)
        super().__init__(header(self._layout), **kwargs)
        self.runs: dict[str, Run] = {}
        """The runs on screen, by id."""
        self._cells: dict[str, tuple] = {}
        """Every column's cell of each run on screen (the narrow layout hides some)."""

    @property
    def column_keys(self) -> list[str]:
        """The keys of the columns shown, left to right."""
        return [KEYS[i] for i, _ in self._layout]

    def get_cell(self, run_id: str, column: str):
        """What the run's row holds in a column (shown or not)."""
        return self._cells[run_id][KEYS.index(column)]

    def show_runs(self, runs: tuple[Run, ...], gpus: dict[str, tuple[int, ...]], progress: Progress | None,
                  progress_run: str | None) -> None:
        """Show runs; gpus maps run id → GPU indices; progress belongs to run id progress_run."""
        self.runs = {r.id: r for r in runs}
        self._cells = {r.id: cells(r, gpus.get(r.id, ()), r.progress or (progress if r.id == progress_run else None))
                       for r in runs}
        self._lay_out()

    def _lay_out(self) -> None:
        self.show([(key, row_line(row, self._layout)) for key, row in self._cells.items()])

    def on_resize(self) -> None:
        """A narrower or wider table: show the columns that fit."""
        self._fit()

    def watch_show_vertical_scrollbar(self, shown: bool) -> None:
        """The scrollbar took or gave back room: fit the columns again."""
        self._fit()

    def _fit(self) -> None:
        layout = fitting(self.scrollable_content_region.width)
        if layout != self._layout:
            self._layout = layout
            self.set_header(header(layout))
            self._lay_out()

    @property
    def current_run(self) -> Run | None:
        """The run under the cursor."""
        key = self.current_key
        return self.runs.get(key) if key else None

    def action_select(self) -> None:
        """Enter on a row: tell the screen which run."""
        run = self.current_run
        if run:
            self.post_message(self.RunSelected(run))
