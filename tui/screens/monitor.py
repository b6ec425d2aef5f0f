"""The drift monitor: each statistic of the last batch against its threshold with a sparkline of its
history, the last batches, and the retrains drift started (drift → event → pipeline run)."""

from __future__ import annotations

import math
import time

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from tui.format import sparkline
from tui.messages import MonitorFetched
from tui.providers.models import MonitorView

HISTORY = 20  # batches in each sparkline


def scaled(values: list[float], threshold: float, direction: str) -> str:
    """A sparkline where higher always means nearer drift, on a scale that holds twice the threshold:
    p-values (drift below the threshold) are drawn as -log10 p."""
    if direction == "below":
        values = [-math.log10(max(v, 1e-9)) for v in values]
        threshold = -math.log10(max(threshold, 1e-9))
    top = max([v for v in values] + [2 * threshold]) or 1.0
    return sparkline([max(v, 0.0) for v in values], top=top)


def when(at: float | None) -> str:
    return time.strftime("%m-%d %H:%M", time.localtime(at)) if at else ""


def estimated_cell(batch) -> str:
    """The batch's accuracy estimated without labels (ATC), and measured when it came labelled."""
    if batch.estimated is None:
        return "" if batch.accuracy is None else f"({batch.accuracy:.0%})"
    measured = f" ({batch.accuracy:.0%})" if batch.accuracy is not None else ""
    return f"{batch.estimated[0]:.0%}{measured}"


def estimated_line(batch) -> str:
    """The status line's second line: the last batch's estimated accuracy against prod's, and its class mix."""
    if batch.estimated is None:
        return ""
    value, low, high = batch.estimated
    prod = f" against {batch.reference_accuracy:.1%} held-out" if batch.reference_accuracy is not None else ""
    mix = " · ".join(f"{name} {share:.0%}" for name, share in batch.priors[:8])
    return f"\naccuracy without labels (ATC) {value:.1%} [{low:.1%}, {high:.1%}]{prod}" + (f" · class mix {mix}" if mix else "")


class MonitorScreen(Screen[None]):
    """`m`: drift statistics, batches and retrains, from the Prefect server (any host's monitor)."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "back"), Binding("g", "refresh", "refresh")]
    """History bars: higher is nearer drift (p-values as -log10 p); the scale holds twice the threshold."""

    def compose(self) -> ComposeResult:
        yield Static("reading the monitor's batches ...", id="monitor-status")
        yield DataTable(id="monitor-stats", cursor_type="row")
        yield DataTable(id="monitor-batches", cursor_type="row")
        yield Static("", id="monitor-retrains")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#monitor-stats").border_title = "last batch: each statistic against its threshold"
        self.query_one("#monitor-batches").border_title = "batches (newest first)"
        self.action_refresh()

    def action_refresh(self) -> None:
        """Fetch again (g)."""
        self.fetch()

    @work(thread=True, exclusive=True, group="monitor")
    def fetch(self) -> None:
        """Blocking: the events and runs from the server."""
        self.post_message(MonitorFetched(self.app.providers.orchestrator.monitor()))

    def on_monitor_fetched(self, message: MonitorFetched) -> None:
        """Fill both tables and the retrain lines."""
        view: MonitorView = message.view
        status = self.query_one("#monitor-status", Static)
        if view.error or not view.batches:
            status.update(view.error or "no batch monitored yet: `tunedeck monitor DIR`, or resume the monitor deployment")
        else:
            last = view.batches[-1]
            verdict = f"[b red]DRIFT[/] {last.streak} in a row" if last.drifted else "[green]no drift[/]"
            status.update(f"{len(view.batches)} batches · last {when(last.at)} {last.folder} · {last.n_images} images "
                          f"vs {last.model_version} · {verdict}" + estimated_line(last))
        self._fill_stats(view)
        self._fill_batches(view)
        lines = [f"{when(r.started)}  drift → retrain [b]{r.name}[/b] ({r.state}): {r.reason}" for r in view.retrains[:5]]
        self.query_one("#monitor-retrains", Static).update("\n".join(lines) or "no retrain started by drift yet")

    def _fill_stats(self, view: MonitorView) -> None:
        table = self.query_one("#monitor-stats", DataTable)
        table.clear(columns=True)
        for col in ("statistic", "value", "threshold", "history", "state"):
            table.add_column(col, key=col)
        if not view.batches:
            return
        recent = view.batches[-HISTORY:]
        for stat in view.batches[-1].statistics:
            values = [next((s.value for s in b.statistics if s.name == stat.name), 0.0) for b in recent]
            rule = f"{'>' if stat.direction == 'above' else '<'} {stat.threshold:g}"
            table.add_row(stat.name, f"{stat.value:.4g}", rule, scaled(values, stat.threshold, stat.direction),
                          "DRIFT" if stat.flagged else "ok", key=stat.name)

    def _fill_batches(self, view: MonitorView) -> None:
        table = self.query_one("#monitor-batches", DataTable)
        table.clear(columns=True)
        for col in ("time", "batch", "model", "images", "est. acc", "streak", "event", "verdict"):
            table.add_column(col, key=col)
        for i, b in enumerate(reversed(view.batches)):
            flagged = ", ".join(s.name for s in b.statistics if s.flagged)
            table.add_row(when(b.at), b.folder[-32:], b.model_version, str(b.n_images), estimated_cell(b),
                          str(b.streak) if b.streak else "", "→ retrain" if b.triggered else "",
                          f"drift: {flagged}" if b.drifted else "ok", key=str(i))
