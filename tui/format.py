"""Pure text helpers for the dashboard's cells: N/A for missing metrics, durations, sparklines, state colours."""

from __future__ import annotations

from collections.abc import Iterable

from rich.text import Text

from tui.providers.models import Progress, Run

NA = "N/A"
TEST_ACC, TEST_MACRO_F1 = "test/acc", "test/macro_f1"
"""The final scores' names (flows.contracts: the labels an evaluate stage puts on its run)."""
BLOCKS = " ▁▂▃▄▅▆▇█"
STATE_STYLES = {
    "RUNNING": "bold cyan", "COMPLETED": "green", "FAILED": "bold red", "CRASHED": "bold magenta",
    "CANCELLED": "dim", "CANCELLING": "yellow", "SCHEDULED": "blue", "PENDING": "blue", "PAUSED": "yellow",
}


def num(value: float | None, fmt: str = "{:.0f}", unit: str = "") -> str:
    """A metric, or N/A when the device does not report it."""
    return NA if value is None else fmt.format(value) + unit


def duration(seconds: float | None) -> str:
    """1h02m, 4m05s, 12s; blank when unknown."""
    if seconds is None:
        return ""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def sparkline(values: Iterable[float | None], top: float = 100.0) -> str:
    """One block character per value, scaled to top."""
    out = []
    for v in values:
        out.append(" " if v is None else BLOCKS[max(0, min(8, round(v / top * 8)))])
    return "".join(out)


def bar(fraction: float | None, width: int = 10) -> str:
    """A horizontal bar of width cells."""
    if fraction is None:
        return NA.ljust(width)
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "░" * (width - filled)


def state_text(state: str, label: str = "") -> Text:
    """The state name in its colour."""
    return Text(label or state.title(), style=STATE_STYLES.get(state, ""))


def short(value: str | None, width: int = 8) -> str:
    """A version hash cut to width."""
    return (value or "")[:width]


def eta(run: Run, progress: Progress | None) -> tuple[str, str]:
    """(epoch k/N, ETA) of a run's training: the ETA it published, else seconds per epoch so far × epochs left.

    The epoch stays once the run has ended (how far it got); the ETA shows only while it trains.
    """
    if progress is None:
        return "", ""
    done = progress.step + 1
    epoch = f"{done}/{progress.epochs}" if progress.epochs else str(done)
    if run.state != "RUNNING" or run.current_stage != "train" or not progress.epochs:
        return epoch, ""
    if progress.eta_s is not None:
        return epoch, duration(progress.eta_s)
    if not run.duration_s:
        return epoch, ""
    return epoch, duration(max(0, progress.epochs - done) * run.duration_s / done)


def metric(progress: Progress | None, run: Run, key: str = "val/acc") -> str:
    """A key metric of the run's training (published, or from this host's dvclive), else blank."""
    if progress is None:
        return ""
    value = dict(progress.metrics).get(key)
    return "" if value is None else f"{value:.3f}"


def energy(run: Run) -> str:
    """The Wh its training drew (GPUs and CPU package): "≥" before the sum when one of the two was unknown,
    "unknown" when neither was read, blank before it trained."""
    parts = [v for k, v in run.cost if k.startswith("energy/")]
    known = [v for v in parts if isinstance(v, float)]
    if not parts:
        return ""
    if not known:
        return "unknown"
    total = sum(known)
    return ("≥" if len(known) < len(parts) else "") + (f"{total:.0f}" if total >= 100 else f"{total:.3g}")


def cost(run: Run) -> str:
    """What its training cost at its host's price per device-hour; blank without a price."""
    total = dict(run.cost).get("cost/total")
    if not isinstance(total, float):
        return ""
    return f"{total:.0f}" if total >= 100 else f"{total:.2f}" if total >= 0.01 or total == 0 else "<0.01"


def score(run: Run, name: str) -> str:
    """A final score of the run (test/acc, test/macro_f1), else blank."""
    value = run.score(name)
    return "" if value is None else f"{value:.3f}"
