"""The deployments list: schedule, paused or active, next runs, last state, work pool and its workers."""

from __future__ import annotations

from rich.text import Text

from tui.format import state_text
from tui.providers.models import Deployment, WorkPool
from tui.providers.prefect_parse import utc
from tui.widgets.keyed_table import KeyedTable

COLUMNS = [("DEPLOYMENT", "name", 26), ("SCHEDULE", "schedule", 16), ("STATUS", "status", 6),
           ("NEXT RUNS (UTC)", "next", 24), ("LAST", "last", 10), ("WORK POOL", "pool", 10), ("WORKERS", "workers", 22)]


class DeploymentsTable(KeyedTable):
    """Deployments and the health of their pools."""

    def __init__(self, **kwargs) -> None:
        super().__init__(COLUMNS, drop_order=("next", "pool", "last", "schedule"), **kwargs)
        self.deployments: dict[str, Deployment] = {}
        """The deployments on screen, by id."""

    def show_deployments(self, deployments: tuple[Deployment, ...], pools: tuple[WorkPool, ...]) -> None:
        """Show deployments with their pools' worker health."""
        self.deployments = {d.id: d for d in deployments}
        by_name = {p.name: p for p in pools}
        rows = []
        for d in deployments:
            status = status_text(d)
            nxt = ", ".join(utc(t) for t in d.next_runs[:2]) or ("—" if d.paused or not d.schedule_active or d.schedule == "none" else "none yet")
            last = state_text(d.last_state) if d.last_state else Text("—", style="dim")
            rows.append((d.id, (f"{d.flow}/{d.name}", d.schedule, status, nxt, last, d.work_pool or "", workers(by_name.get(d.work_pool)))))
        self.show(rows)
        self._say_what_p_does()

    def on_data_table_row_highlighted(self) -> None:
        """The cursor moved: say what `p` does to the deployment now under it."""
        self._say_what_p_does()

    def _say_what_p_does(self) -> None:
        dep = self.current_deployment
        readonly = getattr(self.app, "readonly", False)  # read-only: p does nothing, so say nothing
        self.border_subtitle = p_does(dep) if dep and not readonly else ""

    @property
    def current_deployment(self) -> Deployment | None:
        """The deployment under the cursor."""
        key = self.current_key
        return self.deployments.get(key) if key else None


def status_text(d: Deployment) -> Text:
    """paused, off (its schedules all inactive: nothing starts on its own, beside the SCHEDULE it would follow), or active."""
    if d.paused:
        return Text("paused", style="yellow")
    if not d.schedule_active:
        return Text("off", style="yellow")
    return Text("active", style="green")


def p_does(d: Deployment) -> str:
    """What `p` does to this deployment (the dashboard resumes a paused one and pauses any other)."""
    if d.paused:
        return f"p: resume {d.name}"
    if not d.schedule_active:
        return f"p: resume {d.name}'s schedule (it is off)"
    return f"p: pause {d.name}" if d.schedule == "none" else f"p: pause {d.name}'s schedule"


def workers(pool: WorkPool | None) -> Text:
    """'2/2 online', red when none is."""
    if pool is None:
        return Text("no pool", style="dim")
    style = "green" if pool.workers_online else "bold red"
    return Text(f"{pool.workers_online}/{pool.workers_total} online · {pool.status.lower().replace('_', ' ')}", style=style)
