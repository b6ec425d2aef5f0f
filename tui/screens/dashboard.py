"""The main screen: GPUs, runs and deployments at once; it polls the providers and owns every action."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from functools import cached_property

from textual import events, on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Static

from tui.join_view import gpus_by_run, progress_owner
from tui.messages import OrchestrationFetched, TelemetrySampled
from tui.providers.models import Orchestration, Progress, Run, RunQuery, Telemetry
from tui.query import describe, parse_filter
from tui.screens.jump import to_experiment
from tui.screens.run_actions import RunActions
from tui.screens.run_detail import RunDetailScreen
from tui.widgets.deployments_table import DeploymentsTable
from tui.widgets.gpu_panel import GpuPanel
from tui.widgets.runs_table import RunsTable

PAGE = 100
ACTIONS = {"cancel_run", "retry_run", "toggle_pause", "run_now"}
VIEWS = {"runs": "#runs", "run": "#runs", "deployments": "#deployments", "deploy": "#deployments", "dp": "#deployments",
         "gpus": "#gpu-table", "gpu": "#gpu-table"}


class DashboardScreen(RunActions, Screen[None]):
    """GPU panel on top, runs in the middle, deployments below; `:` commands and `/` filter at the bottom."""

    BINDINGS = [
        Binding("colon", "prompt('command')", "command"), Binding("slash", "prompt('filter')", "filter"),
        Binding("question_mark", "app.help", "help"), Binding("e", "app.experiments", "experiments"),
        Binding("m", "app.monitor", "monitor"), Binding("x", "to_experiment", "its experiment"),
        Binding("left_square_bracket", "page(-1)", "prev page", show=False),
        Binding("right_square_bracket", "page(1)", "next page", show=False),
        Binding("c", "cancel_run", "cancel"), Binding("R", "retry_run", "retry"),
        Binding("p", "toggle_pause", "pause/resume"), Binding("r", "run_now", "run now"),
        Binding("escape", "back", "back", show=False),
    ]

    def __init__(self, refresh_s: float = 1.0) -> None:
        super().__init__()
        self.refresh_s = refresh_s
        self.query_: RunQuery = RunQuery(limit=PAGE)
        """The runs filter and page."""
        self.telemetry: Telemetry | None = None
        self.orchestration: Orchestration | None = None
        """The last snapshot that reached the server (kept while disconnected)."""
        self.connected: bool | None = None
        self.progress: Progress | None = None
        self.prompt_mode = ""
        self._busy: set[str] = set()
        self._drawn_sample = threading.Event()
        self._stop_sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        self._drawn_join: dict[str, tuple[int, ...]] = {}
        self._drawn: tuple = ()

    def compose(self) -> ComposeResult:
        """Banner, three panels, prompt, footer."""
        yield Header()
        yield Static(id="banner")
        yield GpuPanel(id="gpus")
        yield RunsTable(id="runs")
        yield DeploymentsTable(id="deployments")
        yield Input(id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        """First fetch at once, then poll: telemetry every refresh_s, Prefect every 2 × refresh_s."""
        self.query_one("#banner").display = False
        self.query_one("#prompt").display = False
        self.query_one("#gpus").border_title = "GPUs"
        self.query_one("#runs").border_title = "runs"
        self.query_one("#deployments").border_title = "deployments"
        self.query_one("#runs").focus()
        self._first_sample()
        self.poll_prefect()
        self.set_interval(2 * self.refresh_s, self.poll_prefect)

    # -- fetching (worker threads post messages; handlers repaint) --

    def poll_prefect(self) -> None:
        """Start a Prefect snapshot unless one is still running."""
        if "prefect" not in self._busy:
            self._busy.add("prefect")
            self._fetch(self.query_)

    @work(thread=True, group="telemetry", exit_on_error=False)
    def _first_sample(self) -> None:
        self.post_message(TelemetrySampled(self.app.providers.telemetry.sample()))

    def _sample_loop(self) -> None:
        """Every refresh_s after the first sample, on one thread for the screen's life.

        A Textual worker per tick cost a tenth of the CPU at 1 Hz. The thread waits for each
        sample to be drawn before taking the next, so a slow terminal never piles samples up; a
        failing sample is said once and retried on the next tick.
        """
        failed = False
        while not self._stop_sampling.wait(self.refresh_s):
            try:
                telemetry = self.app.providers.telemetry.sample()
            except Exception as exc:  # noqa: BLE001 - a sensor hiccup must not end the sampling
                if not failed:
                    with contextlib.suppress(Exception):
                        self.app.call_from_thread(self.notify, f"Reading telemetry failed: {exc}", severity="error")
                failed = True
                continue
            failed = False
            self._drawn_sample.clear()
            if not self.post_message(TelemetrySampled(telemetry)):
                return  # the screen is closing
            self._drawn_sample.wait(timeout=30)

    @work(thread=True, group="prefect", exit_on_error=False)
    def _fetch(self, query: RunQuery) -> None:
        providers = self.app.providers
        snapshot = providers.orchestrator.snapshot(query)
        self.post_message(OrchestrationFetched(snapshot, providers.experiments.progress()))

    def on_unmount(self) -> None:
        """Let the sampling thread go at once."""
        self._stop_sampling.set()
        self._drawn_sample.set()

    def on_worker_state_changed(self, event) -> None:
        """A worker that failed frees its slot (and says so once) so polling goes on."""
        if event.state.name in ("ERROR", "CANCELLED"):
            self._busy.discard(event.worker.group)
            if event.worker.group == "telemetry" and event.state.name == "ERROR":
                self._start_sampler()  # the next ticks try again
            if event.state.name == "ERROR":
                self.notify(f"Reading {event.worker.group} failed: {event.worker.error}", severity="error")

    @cached_property
    def _gpu_panel(self) -> GpuPanel:
        return self.query_one(GpuPanel)

    def on_telemetry_sampled(self, message: TelemetrySampled) -> None:
        """Repaint the GPU panel and the GPU column of the runs."""
        self.telemetry = message.telemetry
        try:
            self._gpu_panel.show(message.telemetry)
            if gpus_by_run(message.telemetry) != self._drawn_join:
                self._render_runs()
        finally:
            self._drawn_sample.set()
        self._start_sampler()  # the first sample is on screen: sample on from now on

    def _start_sampler(self) -> None:
        if self._sampler is None:
            context = contextvars.copy_context()  # the thread needs to know its app
            self._sampler = threading.Thread(target=context.run, args=(self._sample_loop,), daemon=True,
                                             name="tunedeck-telemetry")
            self._sampler.start()

    def on_orchestration_fetched(self, message: OrchestrationFetched) -> None:
        """Repaint runs and deployments, or raise the banner and keep the last good data."""
        self._busy.discard("prefect")
        snap = message.orchestration
        self.progress = message.progress
        self.connected = snap.connected
        banner = self.query_one("#banner", Static)
        if banner.display != (not snap.connected):
            banner.display = not snap.connected
        if not snap.connected:
            banner.update(f"Prefect disconnected, retrying every {2 * self.refresh_s:g} s: {snap.error}. GPUs and experiments keep working.")
            self._render_runs()
            return
        self.orchestration = snap
        self.query_one(GpuPanel).set_runs(self._known_runs())
        self.query_one(DeploymentsTable).show_deployments(snap.deployments, snap.pools)
        self._render_runs()

    def _known_runs(self) -> dict[str, Run]:
        snap = self.orchestration
        return {r.id: r for r in (*snap.runs, *snap.running)} if snap else {}

    def _render_runs(self) -> None:
        snap = self.orchestration
        table = self.query_one(RunsTable)
        if snap is None:
            table.border_title = "runs · waiting for Prefect" if self.connected is not False else "runs · Prefect disconnected"
            return
        gpus = gpus_by_run(self.telemetry)
        self._drawn_join = gpus
        owner = progress_owner(snap.running, gpus)
        drawn = (snap.runs, gpus, self.progress, owner)
        if drawn != self._drawn:  # nothing changed: skip building 100 rows
            self._drawn = drawn
            table.show_runs(snap.runs, gpus, self.progress, owner)
        q = self.query_
        first = q.offset + 1 if snap.runs else 0
        title = f"runs {first}–{q.offset + len(snap.runs)} of {snap.total_runs}"
        flt = describe(q)
        title += (f" · filter: {flt}" if flt else "") + ("" if self.connected else " · stale")
        subtitle = "[ ] pages" if snap.total_runs > PAGE else ""
        if (title, subtitle) != (table.border_title, table.border_subtitle):
            table.border_title, table.border_subtitle = title, subtitle

    # -- navigation --

    def action_prompt(self, mode: str) -> None:
        """Open the `:` command line or the `/` filter line."""
        prompt = self.query_one("#prompt", Input)
        self.prompt_mode = mode
        prompt.display = True
        prompt.value = ""
        prompt.placeholder = ("runs · deployments · gpus · experiments · help · q" if mode == "command"
                              else "state words (running failed …) and name text; empty clears")
        prompt.border_title = ":" if mode == "command" else "/"
        self.set_focus(prompt)

    async def on_key(self, event: events.Key) -> None:
        """`:` and `/` open the prompt here, in the order keys arrive, and keys typed in the same burst go into it.

        Textual hands each key to the widget focused when the key arrives, so in a burst
        (`tmux send-keys "/ running Enter"`, a paste, a fast typist) the keys after `/` are
        already on their way to the runs table when the prompt takes the focus. They bubble up
        to this screen in order; while the prompt is open they are typed into it.
        """
        prompt = self.query_one("#prompt", Input)
        if not prompt.display:
            if event.key in ("colon", "slash"):
                event.stop()
                event.prevent_default()
                self.action_prompt("command" if event.key == "colon" else "filter")
            return
        if event.key == "enter":
            await prompt.action_submit()
        elif event.key == "backspace":
            prompt.action_delete_left()
        elif event.key == "escape":
            self._close_prompt()
        elif event.is_printable and event.character:
            prompt.insert_text_at_cursor(event.character)
        else:
            return
        event.stop()
        event.prevent_default()

    @on(Input.Submitted, "#prompt")
    def submitted(self, event: Input.Submitted) -> None:
        """Run the command or apply the filter."""
        self._close_prompt()
        if self.prompt_mode == "filter":
            self.apply_filter(event.value)
        else:
            self.run_command(event.value.strip().lstrip(":"))

    def _close_prompt(self) -> None:
        prompt = self.query_one("#prompt", Input)
        prompt.display = False
        self.query_one("#runs").focus()

    def apply_filter(self, text: str) -> None:
        """Filter the runs (state words and name text) and fetch the first page at once."""
        self.query_ = parse_filter(text, PAGE)
        self._refetch()

    def _refetch(self) -> None:
        self._busy.discard("prefect")
        self.workers.cancel_group(self, "prefect")
        self.poll_prefect()

    def run_command(self, command: str) -> None:
        """`:runs`, `:deployments`, `:gpus`, `:experiments`, `:help`, `:q`."""
        word = command.lower()
        if word in VIEWS:
            self.show_view(VIEWS[word])
        elif word in ("experiments", "exp", "e"):
            self.app.action_experiments()
        elif word in ("help", "h", "?"):
            self.app.action_help()
        elif word in ("q", "quit", "q!"):
            self.app.exit(0)
        elif word:
            self.notify(f"Unknown command ':{command}': try :runs, :deployments, :gpus, :experiments or :q.", severity="warning")

    def show_view(self, selector: str) -> None:
        """Focus a panel and fill the screen with it; Escape brings the others back."""
        widget = self.query_one(selector)
        self.minimize()
        widget.focus()
        self.maximize(widget)

    def action_back(self) -> None:
        """Escape: close the prompt, else restore the panels, else clear the filter."""
        if self.query_one("#prompt").display:
            self._close_prompt()
        elif self.maximized is not None:
            self.minimize()
        elif self.query_ != RunQuery(limit=PAGE):
            self.apply_filter("")

    def action_page(self, step: int) -> None:
        """Previous or next page of runs."""
        total = self.orchestration.total_runs if self.orchestration else 0
        offset = max(0, min(self.query_.offset + step * PAGE, max(0, total - 1) // PAGE * PAGE))
        if offset != self.query_.offset:
            self.query_ = RunQuery(self.query_.text, self.query_.states, offset, PAGE)
            self._refetch()

    @on(RunsTable.RunSelected)
    def open_run(self, event: RunsTable.RunSelected) -> None:
        """Enter on a run: the detail view."""
        gpus = gpus_by_run(self.telemetry)
        owner = progress_owner(self.orchestration.running, gpus) if self.orchestration else None
        progress = event.run.progress or (self.progress if event.run.id == owner else None)
        self.app.push_screen(RunDetailScreen(event.run, gpus.get(event.run.id, ()), progress))

    def action_to_experiment(self) -> None:
        """x: the experiments view, on the DVC experiment the highlighted run made (or is making)."""
        run = self.query_one(RunsTable).current_run
        if run:
            to_experiment(self.app, run)

    # -- actions: their side effects live in RunActions --

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        """--readonly hides and blocks every action."""
        return not (action in ACTIONS and self.app.readonly)
