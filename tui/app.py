"""The Textual app: given its providers, it shows the dashboard; ``make_app`` builds it for the CLI and tests."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from tui.providers import Providers, demo_providers, live_providers
from tui.screens.dashboard import DashboardScreen
from tui.screens.help import HelpScreen


class TunedeckApp(App[int]):
    """GPUs, runs, deployments and experiments; every data source comes in through ``providers``."""

    CSS_PATH = "app.tcss"
    TITLE = "tunedeck"
    BINDINGS = [Binding("q", "quit", "quit"), Binding("ctrl+c", "quit", "quit", show=False, priority=True)]

    def __init__(self, providers: Providers, readonly: bool = False, refresh_s: float = 1.0) -> None:
        super().__init__()
        self.providers = providers
        """Telemetry, orchestrator and experiments sources (real, fake or replay)."""
        self.readonly = readonly
        """When True every action is hidden and refused."""
        self.refresh_s = refresh_s
        self.sub_title = f"{providers.label}{' · read-only' if readonly else ''}"

    def get_default_screen(self) -> Screen:
        """The dashboard."""
        return DashboardScreen(self.refresh_s)

    def action_quit(self) -> None:
        """q quits with exit status 0 (from a modal it closes the modal first)."""
        self.exit(0)

    def action_help(self) -> None:
        """? shows the key map."""
        self.push_screen(HelpScreen())

    def action_experiments(self) -> None:
        """e or :experiments opens the experiments view."""
        from tui.screens.experiments import ExperimentsScreen  # plotext: imported when first needed, not at start

        if not isinstance(self.screen, ExperimentsScreen):
            self.push_screen(ExperimentsScreen(self.running_runs()))

    def open_experiment(self, name: str) -> None:
        """The experiments view with the cursor on the experiment name (a run's `x`).

        A run opened from the experiments view goes back to it, on this run's row, rather than
        stacking a second experiments view."""
        from tui.screens.experiments import ExperimentsScreen

        below = self.screen_stack[-2] if len(self.screen_stack) > 1 else None
        if isinstance(below, ExperimentsScreen):
            self.pop_screen()
            below.focus_on(name)
        else:
            self.push_screen(ExperimentsScreen(self.running_runs(), focus=name))

    def running_runs(self) -> tuple:
        """The running runs of the dashboard's last snapshot (the experiments view marks theirs)."""
        snapshot = getattr(self.screen_stack[0], "orchestration", None) if self.screen_stack else None
        return snapshot.running if snapshot else ()

    def action_monitor(self) -> None:
        """m opens the drift monitor."""
        from tui.screens.monitor import MonitorScreen

        if not isinstance(self.screen, MonitorScreen):
            self.push_screen(MonitorScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The command palette (ctrl+p): Textual's own commands and the dashboard's views and filters."""
        yield from super().get_system_commands(screen)
        if isinstance(screen, DashboardScreen):
            for word in ("runs", "deployments", "gpus"):
                yield SystemCommand(f"Show {word}", f"The {word} panel, full screen (:{word})", lambda w=word: screen.run_command(w))
            for state in ("running", "failed", "scheduled"):
                yield SystemCommand(f"Filter runs: {state}", f"Only {state} runs (/{state})", lambda s=state: screen.apply_filter(s))
            yield SystemCommand("Clear the runs filter", "All runs again", lambda: screen.apply_filter(""))
        yield SystemCommand("Experiments", "DVC experiments and training curves (:experiments)", self.action_experiments)
        yield SystemCommand("Key map", "Every key of the dashboard (?)", self.action_help)


def make_app(demo: bool = False, readonly: bool = False, refresh_s: float = 1.0, providers: Providers | None = None) -> TunedeckApp:
    """The one factory: given providers (tests), the demo's fakes, or the live sources of this project."""
    if providers is None:
        providers = demo_providers() if demo else live_providers()
    return TunedeckApp(providers, readonly=readonly, refresh_s=refresh_s)


def run_dashboard(demo: bool = False, readonly: bool = False, refresh_s: float = 1.0, replay: Path | None = None,
                  record: Path | None = None, host_name: str = "") -> int:
    """Run the dashboard in this terminal; returns the exit status. host_name: the process's host setting."""
    if refresh_s < 0.1:
        print(f"tunedeck dash: --refresh {refresh_s} is too fast: use 0.1 seconds or more.", file=sys.stderr)
        return 2
    if not sys.stdout.isatty():
        print("tunedeck dash: needs a terminal (stdout is not a TTY): run it in a terminal, tmux or over ssh -t.", file=sys.stderr)
        return 2
    providers = None
    if replay is not None:
        from tui.providers.replay import load_replay

        providers, readonly = load_replay(replay), True
    elif record is not None:
        from tui.providers.replay import Recorder

        providers = Recorder.wrap(demo_providers() if demo else live_providers(host_name), record)
    elif not demo:
        providers = live_providers(host_name)
    result = make_app(demo, readonly, refresh_s, providers).run()
    return result or 0
