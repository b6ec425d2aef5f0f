"""The dashboard's side effects on the server: cancel or retry a run, pause a schedule, run a deployment now.

A mixin of DashboardScreen (its keys and --readonly check stay there): each action asks first where
it cannot be undone, runs its provider call in a worker thread, and says in one notification what happened.
"""

from __future__ import annotations

from textual import work

from tui.messages import ActionFinished
from tui.providers.base import ActionError
from tui.providers.models import FINAL_STATES, Run
from tui.providers.prefect_parse import run_parameters
from tui.screens.ask import AskScreen
from tui.screens.confirm import ConfirmScreen
from tui.widgets.deployments_table import DeploymentsTable
from tui.widgets.runs_table import RunsTable


class RunActions:
    """c, R, p and r on the dashboard; the screen that mixes this in provides notify, query_one, app and _refetch."""

    def action_cancel_run(self) -> None:
        """c: cancel the highlighted run, after a confirmation."""
        run = self.query_one(RunsTable).current_run
        if run:
            self.confirm_cancel(run)

    def confirm_cancel(self, run: Run) -> None:
        """Ask, then cancel."""
        if run.state in FINAL_STATES:
            self.notify(f"Run {run.name} is already {run.state.lower()}; nothing to cancel.", severity="warning")
            return
        question = f"Cancel run [b]{run.name}[/b] ({run.flow}, {run.state.lower()})?"
        self.app.push_screen(ConfirmScreen(question), lambda yes: yes and self._act(self.app.providers.orchestrator.cancel, run.id))

    def action_retry_run(self) -> None:
        """R: retry the highlighted run."""
        run = self.query_one(RunsTable).current_run
        if run:
            self.retry(run)

    def retry(self, run: Run) -> None:
        """Schedule a finished run again (the server decides whether it can)."""
        if run.state not in FINAL_STATES:
            self.notify(f"Run {run.name} is {run.state.lower()}; only a finished run can be retried.", severity="warning")
            return
        self._act(self.app.providers.orchestrator.retry, run.id)

    def action_toggle_pause(self) -> None:
        """p: pause the highlighted deployment's schedule (after a confirmation), or resume it."""
        dep = self.query_one(DeploymentsTable).current_deployment
        if dep is None:
            return
        set_paused = self.app.providers.orchestrator.set_paused
        if dep.paused or not dep.schedule_active:  # resuming also turns on a schedule that is off
            self._act(set_paused, dep.id, False)
        else:
            question = f"Pause the schedule of [b]{dep.flow}/{dep.name}[/b] ({dep.schedule})? No new runs start until resumed."
            self.app.push_screen(ConfirmScreen(question), lambda yes: yes and self._act(set_paused, dep.id, True))

    def action_run_now(self) -> None:
        """r: run the highlighted deployment now, asking for parameter overrides."""
        dep = self.query_one(DeploymentsTable).current_deployment
        if dep is None:
            self.notify("No deployment to run: create one with `prefect deploy`, then press r.", severity="warning")
            return

        def go(text: str | None) -> None:
            if text is None:
                return
            try:
                params = run_parameters(dep.parameter_names, text)
            except ValueError as exc:
                self.notify(f"{exc}.", severity="error")
                return
            self._act(self.app.providers.orchestrator.run_now, dep.id, params)

        self.app.push_screen(AskScreen(f"Run [b]{dep.flow}/{dep.name}[/b] now. Overrides (empty for the defaults):",
                                       "train.lr=0.0003 train.epochs=3"), go)

    @work(thread=True, group="action", exit_on_error=False)
    def _act(self, call, *args) -> None:
        try:
            self.post_message(ActionFinished(call(*args)))
        except ActionError as exc:
            self.post_message(ActionFinished(str(exc), failed=True))
        except Exception as exc:  # a server that vanished mid-action: one sentence, never a traceback
            self.post_message(ActionFinished(f"The action failed: {exc}", failed=True))

    def on_action_finished(self, message: ActionFinished) -> None:
        """Say what happened, and show it at once."""
        self.notify(message.text, severity="error" if message.failed else "information")
        self._refetch()

