"""The key map (`?`), the same text as in the README."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYMAP = """\
:runs :deployments :gpus :experiments   jump to a panel (k9s style; :q quits)
/            filter runs: state words (running, failed, ...) and name text; Esc clears
Tab          next panel          Enter   run detail (params, metrics, scores, logs that follow)
[ ]          previous / next page of runs
c            cancel the run (asks first)      R   retry the run (deployment runs)
p            pause / resume the deployment's schedule (asks before pausing)
r            run the deployment now, with overrides (train.lr=0.0003 ...)
e            experiments (metrics first, only params that differ): s sorts by the column, a shows all params,
             space marks (curves overlaid), c next metric, d diffs two marked, x its run; ▶ a run is making it
x            from a run: its DVC experiment in the experiments view; from an experiment: its run
m            drift monitor: each statistic against its threshold, the batches, the retrains drift started
ctrl+p       command palette      ?  this help      q  quit
--readonly hides every action."""


class HelpScreen(ModalScreen[None]):
    """Shows KEYMAP; any of Escape, q or ? closes it."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        """The key map in a box."""
        with VerticalScroll(id="dialog"):
            yield Static("[b]tunedeck dash — keys[/b]\n\n" + KEYMAP, id="keymap")
