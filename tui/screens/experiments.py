"""DVC experiments: the table (metrics, then params that differ), sortable, diff two; curves below, overlaid when marked.

An experiment a run is making now is marked ▶ (and listed before it is saved); `x` goes to the
run that made the experiment under the cursor, as the runs table's `x` comes here.
"""

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

from tui.experiment_table import (
    changed_params,
    columns,
    diff,
    experiment_name,
    param_keys,
    pick_metric,
    table_rows,
    with_running,
)
from tui.messages import ExperimentsFetched
from tui.providers.models import Curves, Experiment, Registry, Run, RunQuery
from tui.screens.diff import DiffScreen
from tui.screens.run_detail import RunDetailScreen

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


@dataclass
class RunFound(Message):
    """The flow run that made an experiment (None: no run on the server did)."""

    experiment: str
    run: Run | None
    error: str | None = None


class ExperimentsScreen(Screen[None]):
    """`dvc exp show` in a table, the dvclive curves of the workspace, or the marked experiments' curves overlaid."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "back"), Binding("s", "sort", "sort by column"),
                Binding("space", "mark", "mark"), Binding("d", "diff", "diff marked"),
                Binding("a", "all_params", "all params"), Binding("c", "next_metric", "curve metric"),
                Binding("x", "to_run", "its run")]

    def __init__(self, running: tuple[Run, ...] = (), focus: str | None = None) -> None:
        super().__init__()
        self.running_runs = running
        """The runs running now (the dashboard's last snapshot): the experiments they are making are marked."""
        self.focus_name = focus
        """The experiment to put the cursor on once the table is read (the run the user came from)."""
        self.experiments: tuple[Experiment, ...] = ()
        """Rows as DVC gave them, then the experiments running runs have not saved yet."""
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
        self.experiments = with_running(message.experiments, self.running_runs)
        self.registry = message.registry
        self.query_one("#registry", Static).update(registry_line(message.registry, message.experiments))
        self._status(message.error)
        self._fill()
        self._plot(message.curves)
        if self.focus_name is not None:
            self.focus_on(self.focus_name)
            self.focus_name = None

    def focus_on(self, name: str) -> None:
        """Put the cursor on the experiment named name, or say that there is none."""
        table = self.query_one("#exp-table", DataTable)
        rows = [i for i in range(table.row_count) if self.experiments[self._index(i)].name == name]
        if rows:
            table.move_cursor(row=rows[-1], column=1, animate=False)  # the newest of a name repeated across baselines
        else:
            self.notify(f"No DVC experiment named '{name}' here: the run saves it when it ends, in its worker's clone.",
                        severity="warning")

    def _index(self, row: int) -> int:
        """The experiment shown on a table row."""
        table = self.query_one("#exp-table", DataTable)
        return int(table.coordinate_to_cell_key((row, 0)).row_key.value)

    def _status(self, error: str | None = None) -> None:
        """How many experiments, how many params are hidden, and the keys."""
        saved = tuple(e for e in self.experiments if not e.running)
        hidden = len(param_keys(saved)) - len(changed_params(saved))
        params = "all params (a: only changed)" if self.all_params else f"{hidden} equal params hidden (a shows all)"
        running = sum(1 for e in self.experiments if e.running)
        now = f" · ▶ {running} running" if running else ""
        self.query_one("#exp-status", Static).update(
            error or f"{len(self.experiments)} experiments{now} · {params} · s sorts · space marks · c curve metric · d diffs two"
                     " · x its run")

    def _fill(self) -> None:
        table = self.query_one("#exp-table", DataTable)
        cursor = table.cursor_coordinate
        table.clear(columns=True)
        shown = columns(self.experiments, self.all_params)
        for col in ["", "experiment", "rev", *shown]:
            table.add_column(col, key=col or "mark")
        for index, cells in table_rows(self.experiments, shown, self.sort_column, self.sort_reverse):
            experiment = self.experiments[index]
            version = self.registry.version_of(experiment.rev)
            if version:  # the experiment a registry version was tagged on: its version, and prod marked
                cells = [f"{cells[0]} ({version}{', prod' if version == self.registry.prod else ''})", *cells[1:]]
            if experiment.running:  # a run is making it: what it does now where its commit will be
                cells = [cells[0], experiment.running, *cells[2:]]
            mark = ("●" if index in self.marked else "") + ("▶" if experiment.running else "")
            table.add_row(mark, *cells, key=str(index))
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
        if self.experiments[index].running and not self.experiments[index].rev:
            self.notify(f"{self.experiments[index].name} is still running: its curves come with the experiment, when the run ends.",
                        severity="warning")
            return
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

    def action_to_run(self) -> None:
        """x: the run that made (or is making) the experiment under the cursor."""
        table = self.query_one("#exp-table", DataTable)
        if not self.experiments or table.row_count == 0:
            return
        name = self.experiments[self._index(table.cursor_row)].name
        known = next((r for r in self.running_runs if experiment_name(r) == name), None)
        if known is not None:
            self._open_run(known)
        else:
            self.find_run(name)

    @work(thread=True, exclusive=True, group="find-run")
    def find_run(self, name: str) -> None:
        """Blocking: ask the server for the run named after the experiment (a deployment run saves it under its name)."""
        snapshot = self.app.providers.orchestrator.snapshot(RunQuery(text=name, limit=20))
        if not snapshot.connected:
            self.post_message(RunFound(name, None, snapshot.error))
            return
        self.post_message(RunFound(name, next((r for r in snapshot.runs if experiment_name(r) == name), None)))

    def on_run_found(self, message: RunFound) -> None:
        """Open the run, or say why there is none."""
        if message.run is not None:
            self._open_run(message.run)
        elif message.error:
            self.notify(f"Cannot look up the run of '{message.experiment}': {message.error}.", severity="error")
        else:
            self.notify(f"No run on the Prefect server made '{message.experiment}': `dvc exp run` or `dvc repro` made it "
                        "outside a deployment.", severity="warning")

    def _open_run(self, run: Run) -> None:
        """Back to the run's detail if the user came from it, else its detail on top of this view."""
        below = self.app.screen_stack[-2] if len(self.app.screen_stack) > 1 else None
        if isinstance(below, RunDetailScreen) and below.run.id == run.id:
            self.app.pop_screen()
        else:
            self.app.push_screen(RunDetailScreen(run, run.gpus if run.state == "RUNNING" else (), run.progress))

    def action_diff(self) -> None:
        """Show what differs between the two marked experiments."""
        if len(self.marked) != 2:
            self.notify(f"{len(self.marked)} experiments are marked; mark exactly two with space, then press d.", severity="warning")
            return
        a, b = (self.experiments[i] for i in self.marked)
        self.app.push_screen(DiffScreen(f"{a.name} {a.rev}".strip(), f"{b.name} {b.rev}".strip(), diff(a, b)))


def group_summary(metrics: dict[str, float]) -> str:
    """Each attribute's worst-group accuracy and gap (eval/groups_metrics.json, data.groups), or ""."""
    attributes = sorted(k.rsplit(".", 1)[0] for k in metrics if k.endswith(".worst_accuracy"))
    return "; ".join(f"worst {a} group {metrics[f'{a}.worst_accuracy']:.3f}"
                     + (f", gap {metrics[f'{a}.gap']:.3f}" if f"{a}.gap" in metrics else "") for a in attributes)


def registry_line(registry: Registry, experiments: tuple[Experiment, ...] = ()) -> str:
    """The registry in two lines: prod (with its worst group, when the data has groups) and the versions, then the
    latest events."""
    if not registry.versions:
        return "model registry: no version yet (`tunedeck promote` registers the first)"
    import time

    versions = ", ".join(v for v, _ in registry.versions)
    events = " · ".join(f"{time.strftime('%m-%d %H:%M', time.localtime(e.at))} {e.version} {e.what}"
                        for e in registry.history[:3])
    commit = dict(registry.versions).get(registry.prod or "", "")
    row = next((e for e in experiments if commit and e.rev and (commit.startswith(e.rev) or e.rev.startswith(commit))), None)
    groups = group_summary(dict(row.metrics)) if row is not None else ""
    return (f"model registry: prod [b]{registry.prod or 'none'}[/b]{f' ({groups})' if groups else ''} · versions {versions}"
            f"\nhistory: {events}")
