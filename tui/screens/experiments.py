"""DVC experiments: the table (metrics, then params that differ), sortable, diff two; curves below, overlaid when marked."""

from __future__ import annotations

from dataclasses import dataclass

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static
from textual_plotext import PlotextPlot

from tui.experiment_table import changed_params, columns, diff, param_keys, pick_metric, table_rows
from tui.messages import ExperimentsFetched
from tui.providers.models import Curves, Experiment, Registry
from tui.screens.diff import DiffScreen

MAX_MARKED = 6
"""At most this many experiments are marked (one colour each in the overlay)."""
COLOURS = ("cyan", "magenta", "yellow", "green", "red", "blue")


@dataclass
class OverlayFetched(Message):
    """The curves of the marked experiments for one metric, and the metrics they have."""

    metric: str | None
    metrics: tuple[str, ...]
    curves: Curves
    error: str | None = None


class ExperimentsScreen(Screen[None]):
    """`dvc exp show` in a table, the dvclive curves of the workspace, or the marked experiments' curves overlaid."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "back"), Binding("s", "sort", "sort by column"),
                Binding("space", "mark", "mark"), Binding("d", "diff", "diff marked"),
                Binding("a", "all_params", "all params"), Binding("c", "next_metric", "curve metric")]

    def __init__(self) -> None:
        super().__init__()
        self.experiments: tuple[Experiment, ...] = ()
        """Rows as DVC gave them."""
        self.marked: list[int] = []
        """Indices of the marked experiments (names repeat across baselines): overlaid curves, a diff of two."""
        self.sort_column: str | None = None
        self.sort_reverse = False
        self.all_params = False
        """Show every param, not only those that differ between the rows (`a` toggles)."""
        self.curve_metric: str | None = None
        """The dvclive metric the marked experiments' curves are overlaid for (`c` cycles)."""
        self.curve_metrics: tuple[str, ...] = ()
        """The dvclive metrics the marked experiments have."""
        self.overlay: list[tuple[str, list[float], list[float]]] = []
        """(legend label, steps, values) per marked experiment, exactly as handed to plotext."""
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
            yield PlotextPlot(id="curves-overlay")
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
        self._status(message.error)
        self._fill()
        self._plot(message.curves)

    def _status(self, error: str | None = None) -> None:
        """How many experiments, how many params are hidden, and the keys."""
        hidden = len(param_keys(self.experiments)) - len(changed_params(self.experiments))
        params = "all params (a: only changed)" if self.all_params else f"{hidden} equal params hidden (a shows all)"
        self.query_one("#exp-status", Static).update(
            error or f"{len(self.experiments)} experiments · {params} · s sorts · space marks · c curve metric · d diffs two")

    def _fill(self) -> None:
        table = self.query_one("#exp-table", DataTable)
        cursor = table.cursor_coordinate
        table.clear(columns=True)
        shown = columns(self.experiments, self.all_params)
        for col in ["", "experiment", "rev", *shown]:
            table.add_column(col, key=col or "mark")
        for index, cells in table_rows(self.experiments, shown, self.sort_column, self.sort_reverse):
            version = self.registry.version_of(self.experiments[index].rev)
            if version:  # the experiment a registry version was tagged on: its version, and prod marked
                cells = [f"{cells[0]} ({version}{', prod' if version == self.registry.prod else ''})", *cells[1:]]
            table.add_row("●" if index in self.marked else "", *cells, key=str(index))
        table.move_cursor(row=cursor.row, column=cursor.column, animate=False)

    def _plot(self, curves: Curves) -> None:
        """Losses on the left, the other metrics (accuracy, F1 ...) on the right: their scales differ."""
        self.query_one("#curves-overlay").display = False
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

    def action_all_params(self) -> None:
        """Show every param, or only those that differ between the rows."""
        self.all_params = not self.all_params
        self._status()
        self._fill()

    def action_mark(self) -> None:
        """Mark (or unmark) the experiment under the cursor, then overlay the marked ones' curves."""
        table = self.query_one("#exp-table", DataTable)
        if not self.experiments:
            return
        index = int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
        self.marked = [m for m in self.marked if m != index] if index in self.marked else (self.marked + [index])[-MAX_MARKED:]
        self._fill()
        self._refresh_overlay()

    def action_next_metric(self) -> None:
        """Overlay the next dvclive metric the marked experiments have."""
        if not self.marked:
            self.notify("Mark experiments with space first; c then cycles the metric their curves show.", severity="warning")
            return
        if self.curve_metrics:
            at = self.curve_metrics.index(self.curve_metric) if self.curve_metric in self.curve_metrics else -1
            self.curve_metric = self.curve_metrics[(at + 1) % len(self.curve_metrics)]
        self._refresh_overlay()

    def _refresh_overlay(self) -> None:
        if self.marked:
            self.fetch_overlay([self.experiments[i].rev for i in self.marked], self.curve_metric)
        else:
            self.overlay = []
            self.query_one("#curves-overlay").display = False
            for selector in ("#curves-loss", "#curves-metrics"):
                self.query_one(selector).display = True

    @work(thread=True, exclusive=True, group="overlay")
    def fetch_overlay(self, revs: list[str], metric: str | None) -> None:
        """Blocking: which metrics the marked experiments have, and their curves of one."""
        source = self.app.providers.experiments
        if not hasattr(source, "experiment_curves"):
            self.post_message(OverlayFetched(None, (), Curves(()), "this source has no per-experiment curves"))
            return
        try:
            metrics = tuple(source.curve_metrics(revs))
            chosen = pick_metric(metrics, metric)
            curves = source.experiment_curves(revs, chosen) if chosen else Curves(())
            self.post_message(OverlayFetched(chosen, metrics, curves))
        except (RuntimeError, OSError, ValueError) as exc:
            self.post_message(OverlayFetched(metric, (), Curves(()), str(exc)))

    def on_overlay_fetched(self, message: OverlayFetched) -> None:
        """Draw one series per marked experiment, one colour each, with a legend."""
        if not self.marked:
            return
        self.curve_metric, self.curve_metrics = message.metric, message.metrics
        by_rev = {rev: (steps, values) for rev, steps, values in message.curves.series}
        self.overlay = []
        for i in self.marked:
            e = self.experiments[i]
            steps, values = by_rev.get(e.rev, ((), ()))
            if values:
                self.overlay.append((f"{e.name} {e.rev}".strip(), list(steps), list(values)))
        plot = self.query_one("#curves-overlay", PlotextPlot)
        for selector in ("#curves-loss", "#curves-metrics"):
            self.query_one(selector).display = False
        plot.display = True
        plot.border_title = message.error or (f"{message.metric} · {len(self.overlay)} of {len(self.marked)} marked"
                                              f" experiments · c: next metric" if message.metric else "no dvclive curves")
        plt = plot.plt
        plt.clear_data()
        for (label, steps, values), colour in zip(self.overlay, COLOURS, strict=False):
            plt.plot(steps, values, label=label, color=colour)
        plt.xlabel("step")
        plot.refresh()

    def action_diff(self) -> None:
        """Show what differs between the two marked experiments."""
        if len(self.marked) != 2:
            self.notify(f"{len(self.marked)} experiments are marked; mark exactly two with space, then press d.", severity="warning")
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
