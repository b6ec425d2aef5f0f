"""One run in full: header, params, metrics and summary, and its log, which follows while open."""

from __future__ import annotations

import yaml
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Log, Static

from tui.format import duration, state_text
from tui.messages import DetailFetched
from tui.providers.models import Progress, Run
from tui.screens.jump import to_experiment


class RunDetailScreen(Screen[None]):
    """Params and metrics on the left, the log on the right; Escape goes back."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "back"), Binding("c", "cancel", "cancel run"),
                Binding("R", "retry", "retry run"), Binding("x", "to_experiment", "its experiment")]

    def __init__(self, run: Run, gpus: tuple[int, ...], progress: Progress | None, follow_s: float = 2.0) -> None:
        super().__init__()
        self.run = run
        self.gpus = gpus
        self.progress = progress
        self.follow_s = follow_s
        self._lines = 0

    def compose(self) -> ComposeResult:
        """Header, two columns, footer."""
        r = self.run
        head = state_text(r.state, r.state_name)
        head.append(f"  {r.name}  ·  stage {r.current_stage}  ·  {r.deployment or 'no deployment'}  ·  {duration(r.duration_s)}"
                    f"  ·  GPUs {','.join(map(str, self.gpus)) or 'none'}", style="bold")
        yield Static(head, id="detail-head")
        with Horizontal():
            with VerticalScroll(id="detail-side"):
                yield Static(self._side(), id="detail-params")
            yield Log(id="detail-log", highlight=False)
        yield Footer()

    def _side(self) -> str:
        r = self.run
        parts = [f"id {r.id}", *([f"host {r.host}"] if r.host else []), f"data {r.data_version or '—'}", f"model {r.model_version or '—'}", "", "[b]params[/b]",
                 yaml.safe_dump(r.parameters, sort_keys=False, default_flow_style=False).strip() or "—"]
        if self.progress:
            source = "published" if self.progress is r.progress else "dvclive"
            parts += ["", f"[b]metrics[/b] ({source}, epoch {self.progress.step + 1}/{self.progress.epochs or '?'})"]
            parts += [f"{k} {v:.4g}" for k, v in self.progress.metrics]
        if r.scores:
            parts += ["", "[b]scores[/b] (the evaluate stage's, on the test split)"]
            parts += [f"{k} {v:.4g}" for k, v in r.scores]
        if r.cost:
            parts += ["", "[b]energy and cost[/b] (its training's: Wh, device-hours, at the host's price)"]
            parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.cost]
        return "\n".join(parts).replace("[", "\\[").replace("\\[b]", "[b]").replace("\\[/b]", "[/b]")

    def on_mount(self) -> None:
        """Fetch the log now and every follow_s seconds while open."""
        self.query_one(Log).border_title = "log (follows)"
        self.fetch()
        self.set_interval(self.follow_s, self.fetch)

    @work(thread=True, exclusive=True, group="detail")
    def fetch(self) -> None:
        """Blocking: the run's logs and artifacts."""
        self.post_message(DetailFetched(self.app.providers.orchestrator.detail(self.run.id)))

    def on_detail_fetched(self, message: DetailFetched) -> None:
        """Append the new log lines; show the summary artifacts under the params once."""
        new = message.detail.logs[self._lines:]
        if new:
            self.query_one(Log).write_lines(new)
            self._lines = len(message.detail.logs)
        if message.detail.artifacts and not getattr(self, "_arts", False):
            self._arts = True
            side = self.query_one("#detail-params", Static)
            side.update(self._side() + "\n\n[b]summary[/b]\n" + "\n".join(message.detail.artifacts).replace("[", "\\["))

    def action_to_experiment(self) -> None:
        """x: the experiment this run made, in the experiments view (x there comes back here)."""
        to_experiment(self.app, self.run)

    def action_cancel(self) -> None:
        """Cancel from here too (the dashboard asks first)."""
        dashboard = self.app.screen_stack[0]  # the run may have been opened from the experiments view
        self.app.pop_screen()
        dashboard.confirm_cancel(self.run)

    def action_retry(self) -> None:
        """Retry from here too."""
        dashboard = self.app.screen_stack[0]
        self.app.pop_screen()
        dashboard.retry(self.run)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """Read-only hides cancel and retry."""
        return not (action in ("cancel", "retry") and self.app.readonly)
