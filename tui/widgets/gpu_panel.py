"""The GPU panel: the host line, then one row per GPU naming the flow run that uses it."""

from __future__ import annotations

from collections import deque
from functools import cached_property

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from tui.format import NA, bar, duration, num, sparkline
from tui.providers.models import GpuSample, RemoteHost, Run, Telemetry
from tui.widgets.keyed_table import columns_that_fit
from tui.widgets.line_table import GAP, Layout, LineTable, row_line

HISTORY = 14
COLUMNS = [("GPU", "gpu", 3), ("UTIL", "util", 15), ("HISTORY", "hist", HISTORY), ("MEM GiB", "mem", 10),
           ("TEMP", "temp", 4), ("POWER W", "power", 7), ("CLK MHz", "clk", 9), ("RUN (stage · deployment)", "run", 36),
           ("PID:MEM", "procs", 12)]


DROPPED_FIRST = ("clk", "hist", "power", "temp", "procs")
"""The columns a narrow terminal loses, in this order: GPU, UTIL, MEM and RUN (the join) always stay."""
RUN_MAX = 64  # a wide terminal gives RUN the room left over, up to this many cells

FULL: Layout = tuple((i, width) for i, (_, _, width) in enumerate(COLUMNS))


def fitting(width: int) -> Layout:
    """The columns that fit in width cells, the least useful dropped first; RUN takes the room left over."""
    # n columns draw n - 1 gaps and the table's 1-cell left margin
    kept = columns_that_fit([(key, w) for _, key, w in COLUMNS], DROPPED_FIRST, width + len(GAP) - 1, len(GAP))
    keep = [(i, w) for i, (_, key, w) in enumerate(COLUMNS) if key in kept]
    used = sum(w for _, w in keep) + len(GAP) * (len(keep) - 1) + 1
    run = kept.index("run")
    extra = max(0, min(width - used, RUN_MAX - keep[run][1]))
    return tuple((i, w + extra if key == "run" else w) for (i, w), key in zip(keep, kept, strict=True))


def header(layout: Layout = FULL) -> str:
    """The labels of the columns shown."""
    return GAP.join(COLUMNS[i][0].ljust(width) for i, width in layout).rstrip()


class GpuPanel(Vertical):
    """Host telemetry and per-GPU rows with utilisation history."""

    ALLOW_MAXIMIZE = True  # `:gpus` fills the screen with the host line and the rows

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: dict[tuple[str, int], deque[float | None]] = {}
        """Recent utilisation per (host, GPU index), newest last; this host is ""."""
        self.telemetry: Telemetry | None = None
        """The sample on screen."""
        self.runs: dict[str, Run] = {}
        """Flow runs by id, to name the run on each GPU."""
        self._host_line: Text | None = None
        self._layout = FULL
        """The columns that fit the panel's width."""

    def compose(self) -> ComposeResult:
        """The host line and the GPU table."""
        yield Static(id="host-line")
        yield LineTable(header(), id="gpu-table")

    @cached_property
    def _host(self) -> Static:
        return self.query_one("#host-line", Static)

    @cached_property
    def _table(self) -> LineTable:
        return self.query_one(LineTable)

    def on_resize(self) -> None:
        """A narrower or wider panel: show the columns that fit, RUN always among them."""
        self._fit()

    def on_line_table_viewport_changed(self, event: LineTable.ViewportChanged) -> None:
        """The rows' scrollbar came or went: fit the columns to the room left."""
        event.stop()
        self._fit()

    def _fit(self) -> None:
        layout = fitting(self.content_region.width - self._table.scrollbar_size_vertical)
        if layout != self._layout:
            self._layout = layout
            self._table.set_header(header(layout))
            if self.telemetry:
                self._paint()

    def show(self, telemetry: Telemetry) -> None:
        """A new sample: add it to the history and repaint."""
        self.telemetry = telemetry
        for g in telemetry.gpus:
            self.history.setdefault(("", g.index), deque(maxlen=HISTORY)).append(g.util)
        for remote in telemetry.remote:
            for g in remote.gpus:
                self.history.setdefault((remote.host.hostname, g.index), deque(maxlen=HISTORY)).append(
                    None if remote.stale else g.util)
        self._paint()

    def set_runs(self, runs: dict[str, Run]) -> None:
        """New run names (from Prefect): repaint the RUN column if the sample is here."""
        if self.telemetry:
            every = (*self.telemetry.gpus, *(g for r in self.telemetry.remote for g in r.gpus))
            on_gpus = {p.flow_run_id for g in every for p in g.processes if p.flow_run_id}
            if ({i: runs.get(i) for i in on_gpus} == {i: self.runs.get(i) for i in on_gpus}
                    and slot_runs(runs) == slot_runs(self.runs)):
                self.runs = runs
                return  # the runs named on the GPU rows are the same: nothing to repaint
        self.runs = runs
        if self.telemetry:
            self._paint()

    def _paint(self) -> None:
        telemetry, runs = self.telemetry, self.runs
        h = telemetry.host
        line = Text.assemble(
            (h.hostname, "bold"), f"   CPU {h.cpu_percent:3.0f}% of {h.cpu_count} cores   ",
            f"RAM {h.ram_used_gib:.1f}/{h.ram_total_gib:.1f} GiB   disk {h.disk_used_gib:.0f}/{h.disk_total_gib:.0f} GiB",
        )
        if telemetry.no_gpu:
            line.append(f"\n{telemetry.no_gpu}", style="bold yellow")
        for g in telemetry.gpus:
            if g.note:
                line.append(f"\nGPU {g.index} {g.name}: {g.note}", style="yellow")
        if line != self._host_line:  # an unchanged line would still cost a repaint
            # the same number of lines needs no layout pass of the whole screen, only a repaint
            same_height = self._host_line is not None and self._host_line.plain.count("\n") == line.plain.count("\n")
            self._host_line = line
            self._host.update(line, layout=not same_height)
        table = self._table
        remote_gpus = sum(len(r.gpus) for r in telemetry.remote)
        if telemetry.remote:
            title = f"GPUs · {len(telemetry.gpus) + remote_gpus} on {1 + len(telemetry.remote)} hosts"
        else:
            title = f"GPUs · {kinds(telemetry.gpus)}" if telemetry.gpus else "GPUs · none"
        if title != self.border_title:
            table.display = bool(telemetry.gpus) or bool(telemetry.remote)
            self.border_title = title
        slots = slot_runs(runs)
        local = h.hostname
        rows = [(f"gpu{g.index}", row_line(self._cells(g, runs, local, slots.get((local, g.index), ())), self._layout))
                for g in telemetry.gpus]
        for remote in telemetry.remote:
            name = remote.host.hostname
            rows.append((f"host:{name}", host_row(remote)))
            if not remote.stale:
                rows += [(f"{name}/gpu{g.index}", row_line(self._cells(g, runs, name, slots.get((name, g.index), ())), self._layout))
                         for g in remote.gpus]
        table.show(rows)

    def _cells(self, g: GpuSample, runs: dict[str, Run], hostname: str = "", slot: tuple[str, ...] = ()) -> tuple:
        hist = self.history.get(("" if hostname == self.telemetry.host.hostname else hostname, g.index), ())
        frac = None if g.util is None else g.util / 100
        if g.note:  # a device no reader reads: what it is says so in place of its figures, and the run on its slot
            return (str(g.index), Text("no reader", style="yellow"), "", "", "", "", "", run_label(g, runs, slot),
                    processes(g))
        mem = NA if g.mem_used_mib is None else f"{g.mem_used_mib / 1024:.1f}/{(g.mem_total_mib or 0) / 1024:.0f}"
        power = NA if g.power_w is None else f"{g.power_w:.0f}/{num(g.power_limit_w)}"
        clocks = f"{num(g.sm_clock_mhz)}/{num(g.mem_clock_mhz)}"
        return (str(g.index), f"{bar(frac)}{num(g.util, unit='%'):>5}", sparkline(hist).rjust(HISTORY), mem,
                num(g.temp_c, unit="°"), power, clocks, run_label(g, runs, slot), processes(g))


def kinds(gpus: tuple[GpuSample, ...]) -> str:
    """How many GPUs of each name: "2 × NVIDIA H100", or "1 × NVIDIA L4, 1 × AMD Radeon PRO W7900 (amdgpu)"."""
    counts: dict[str, int] = {}
    for g in gpus:
        counts[g.name] = counts.get(g.name, 0) + 1
    return ", ".join(f"{n} × {name}" for name, n in counts.items())


def slot_runs(runs: dict[str, Run]) -> dict[tuple[str, int], tuple[str, ...]]:
    """(host, GPU index) → the running runs that hold that GPU's slot (their host and gpus labels)."""
    found: dict[tuple[str, int], list[str]] = {}
    for run in runs.values():
        if run.state == "RUNNING" and run.host:
            for index in run.gpus:
                found.setdefault((run.host, index), []).append(run.id)
    return {k: tuple(v) for k, v in found.items()}


def host_row(remote: RemoteHost) -> Text:
    """The line above another host's GPUs: its name, CPU and RAM, or that it stopped reporting."""
    h = remote.host
    line = Text.assemble(("▸ ", "dim"), (h.hostname, "bold"))
    if remote.stale:
        line.append(f"   stale: no telemetry for {duration(remote.age_s)} (its worker stopped?)", style="bold yellow")
        return line
    line.append(f"   CPU {h.cpu_percent:3.0f}% of {h.cpu_count}   RAM {h.ram_used_gib:.1f}/{h.ram_total_gib:.1f} GiB")
    if remote.worker:
        line.append(f"   worker · pool {remote.worker}", style="dim")
    if remote.no_gpu:
        line.append("   no GPU", style="yellow")
    return line


def run_label(g: GpuSample, runs: dict[str, Run], slot: tuple[str, ...] = ()) -> Text:
    """Which flow run uses this GPU (its processes, or the run holding the GPU's slot): name, stage, deployment.

    A process that belongs to no run is flagged.
    """
    ids = list(dict.fromkeys([*(p.flow_run_id for p in g.processes if p.flow_run_id), *slot]))
    if not ids:
        return Text("no flow run (orphan process?)", style="bold yellow") if g.processes else Text("idle", style="dim")
    parts = []
    for run_id in ids:
        run = runs.get(run_id)
        parts.append(f"{run.name} ({run.current_stage}{' · ' + run.deployment if run.deployment else ''})" if run else run_id[:8])
    return Text(", ".join(parts))


def processes(g: GpuSample) -> str:
    """pid:MiB of each process on the GPU (its pid alone where the driver does not say its memory)."""
    return " ".join(f"{p.pid}:{num(p.used_mib)}M" if p.used_mib is not None else str(p.pid) for p in g.processes)
