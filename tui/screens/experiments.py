"""DVC experiments: the table (params that vary, metrics), sortable, diff two; training curves below."""

from __future__ import annotations

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static
from textual_plotext import PlotextPlot

from tui.experiment_table import diff, table_columns, table_rows
from tui.messages import ExperimentsFetched
from tui.providers.models import Curves, Experiment, Registry
from tui.screens.diff import DiffScreen


class ExperimentsScreen(Screen[None]):
    """`dvc exp show` in a table, and the dvclive curves of the workspace."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "back"), Binding("s", "sort", "sort by column"),
                Binding("space", "mark", "mark"), Binding("d", "diff", "diff marked")]

    def __init__(self) -> None:
        super().__init__()
        self.experiments: tuple[Experiment, ...] = ()
        """Rows as DVC gave them."""
        self.marked: list[int] = []
        """Indices of the (at most two) experiments marked for a diff (names repeat across baselines)."""
        self.sort_column: str | None = None
        self.sort_reverse = False
        self.registry = Registry()
        """The model registry: which version is prod, and its history."""

    def compose(self) -> ComposeResult:
        """Table, curves, footer."""
        yield Static("reading experiments (dvc exp show) ...", id="exp-status")
        yield Static("", id="registry")
        yield DataTable(id="exp-table", cursor_type="cell")
        with Horizontal(id="curves"):
            yield PlotextPlot(id="curves-loss")
            yield PlotextPlot(id="curves-metrics")
        yield Footer()

    def on_mount(self) -> None:
        """Fetch in a worker (dvc exp show takes about a second)."""
        self.query_one("#exp-table").border_title = "experiments"
        self.query_one("#curves-loss").border_title = "loss per epoch (dvclive)"
        self.query_one("#curves-metrics").border_title = "accuracy and other metrics per epoch (dvclive)"
        self.fetch()

    @work(thread=True, exclusive=True, group="experiments")
    def fetch(self) -> None:
        """Blocking: experiments and curves."""
        source = self.app.providers.experiments
        curves = source.curves()
        try:
            registry = source.registry()
        except (RuntimeError, OSError, ValueError):
            registry = Registry()
        try:
            self.post_message(ExperimentsFetched(source.experiments(), curves, registry=registry))
        except (RuntimeError, OSError, ValueError) as exc:
            self.post_message(ExperimentsFetched((), curves, str(exc), registry))

    def on_experiments_fetched(self, message: ExperimentsFetched) -> None:
        """Fill the table and draw the curves."""
        self.experiments = message.experiments
        self.registry = message.registry
        self.query_one("#registry", Static).update(registry_line(message.registry))
        status = self.query_one("#exp-status", Static)
        status.update(message.error or f"{len(self.experiments)} experiments · s sorts by the cursor's column · space marks · d diffs two")
        self._fill()
        self._plot(message.curves)

    def _fill(self) -> None:
        table = self.query_one("#exp-table", DataTable)
        cursor = table.cursor_coordinate
        table.clear(columns=True)
        columns = table_columns(self.experiments)
        for col in ["", "experiment", "rev", *columns]:
            table.add_column(col, key=col or "mark")
        for index, cells in table_rows(self.experiments, columns, self.sort_column, self.sort_reverse):
            version = self.registry.version_of(self.experiments[index].rev)
            if version:  # the experiment a registry version was tagged on: its version, and prod marked
                cells = [f"{cells[0]} ({version}{', prod' if version == self.registry.prod else ''})", *cells[1:]]
            table.add_row("●" if index in self.marked else "", *cells, key=str(index))
        table.move_cursor(row=cursor.row, column=cursor.column, animate=False)

    def _plot(self, curves: Curves) -> None:
        """Losses on the left, the other metrics (accuracy, F1 ...) on the right: their scales differ."""
        for selector, wanted in (("#curves-loss", True), ("#curves-metrics", False)):
            plot = self.query_one(selector, PlotextPlot)
            plt = plot.plt
            plt.clear_data()
            for name, steps, values in curves.series:
                if ("loss" in name.lower()) == wanted:
                    plt.plot(list(steps), list(values), label=name)
            plt.xlabel("epoch")
            plot.refresh()

    def action_sort(self) -> None:
        """Sort by the column under the cursor (again: reverse)."""
        table = self.query_one("#exp-table", DataTable)
        key = list(table.columns)[table.cursor_column].value
        if key in ("mark",):
            return
        self.sort_reverse = not self.sort_reverse if self.sort_column == key else False
        self.sort_column = key
        self._fill()

    def action_mark(self) -> None:
        """Mark (or unmark) the experiment under the cursor; at most two stay marked."""
        table = self.query_one("#exp-table", DataTable)
        if not self.experiments:
            return
        index = int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        self.marked = [m for m in self.marked if m != index] if index in self.marked else (self.marked + [index])[-2:]
        self._fill()

    def action_diff(self) -> None:
        """Show what differs between the two marked experiments."""
        if len(self.marked) != 2:
            self.notify("Mark two experiments with space first, then press d.", severity="warning")
            return
        a, b = (self.experiments[i] for i in self.marked)
        self.app.push_screen(DiffScreen(f"{a.name} {a.rev}".strip(), f"{b.name} {b.rev}".strip(), diff(a, b)))


def registry_line(registry: Registry) -> str:
    """The registry in two lines: prod and the versions, then the latest events."""
    if not registry.versions:
        return "model registry: no version yet (`tunedeck promote` registers the first)"
    import time

    versions = ", ".join(v for v, _ in registry.versions)
    events = " · ".join(f"{time.strftime('%m-%d %H:%M', time.localtime(e.at))} {e.version} {e.what}"
                        for e in registry.history[:3])
    return f"model registry: prod [b]{registry.prod or 'none'}[/b] · versions {versions}\nhistory: {events}"
