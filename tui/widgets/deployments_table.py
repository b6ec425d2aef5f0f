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
            status = Text("paused", style="yellow") if d.paused else Text("active", style="green")
            nxt = ", ".join(utc(t) for t in d.next_runs[:2]) or ("—" if d.paused or d.schedule == "none" else "none yet")
            last = state_text(d.last_state) if d.last_state else Text("—", style="dim")
            rows.append((d.id, (f"{d.flow}/{d.name}", d.schedule, status, nxt, last, d.work_pool or "", workers(by_name.get(d.work_pool)))))
        self.show(rows)

    @property
    def current_deployment(self) -> Deployment | None:
        """The deployment under the cursor."""
        key = self.current_key
        return self.deployments.get(key) if key else None


def workers(pool: WorkPool | None) -> Text:
    """'2/2 online', red when none is."""
    if pool is None:
        return Text("no pool", style="dim")
    style = "green" if pool.workers_online else "bold red"
    return Text(f"{pool.workers_online}/{pool.workers_total} online · {pool.status.lower().replace('_', ' ')}", style=style)
