"""What differs between two experiments: params and metrics side by side."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable


class DiffScreen(ModalScreen[None]):
    """A three-column table: key, first, second; Escape closes."""

    BINDINGS = [Binding("escape,q,d", "dismiss", "close")]

    def __init__(self, first: str, second: str, rows: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.first, self.second, self.rows = first, second, rows

    def compose(self) -> ComposeResult:
        """The differing keys."""
        with VerticalScroll(id="dialog"):
            yield DataTable(id="diff-table", cursor_type="row")

    def on_mount(self) -> None:
        """Fill the table."""
        table = self.query_one(DataTable)
        table.border_title = f"diff {self.first} ↔ {self.second}"
        table.add_columns("key", self.first, self.second)
        for row in self.rows or [("(no differences)", "", "")]:
            table.add_row(*row)
