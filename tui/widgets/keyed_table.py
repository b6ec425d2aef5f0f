"""A DataTable that takes whole row sets keyed by id and repaints only the cells that changed."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import DataTable


def fit(cell: object, width: int | None) -> object:
    """A cell cut to a fixed column width with an ellipsis, so a cut name says it was cut."""
    if width is None:
        return cell
    if isinstance(cell, str) and len(cell) > width:
        return cell[: width - 1] + "…"
    if isinstance(cell, Text) and cell.cell_len > width:
        cut = cell.copy()
        cut.truncate(width, overflow="ellipsis")
        return cut
    return cell


class KeyedTable(DataTable):
    """DataTable with ``show(rows)``: rows = [(key, cells)], diffed against what is on screen."""

    DEFAULT_CSS = ""

    def __init__(self, columns: Sequence[tuple[str, str, int | None]], **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self._columns = columns
        self._shown: list[tuple[str, tuple]] = []

    def on_mount(self) -> None:
        """Add the columns once."""
        for label, key, width in self._columns:
            self.add_column(label, key=key, width=width)

    def show(self, rows: list[tuple[str, tuple]]) -> None:
        """Make the table show rows; same keys in the same order → only changed cells are updated."""
        widths = [width for _, _, width in self._columns]
        rows = [(key, tuple(fit(cell, w) for cell, w in zip(cells, widths, strict=True))) for key, cells in rows]
        if [k for k, _ in rows] == [k for k, _ in self._shown]:
            for (key, cells), (_, old) in zip(rows, self._shown, strict=True):
                for (_, column, _), new, before in zip(self._columns, cells, old, strict=True):
                    if new != before:
                        self.update_cell(key, column, new)
        else:
            current = self.current_key
            self.clear()
            for key, cells in rows:
                self.add_row(*cells, key=key)
            keys = [k for k, _ in rows]
            if current in keys:
                self.move_cursor(row=keys.index(current), animate=False)
        self._shown = rows

    @property
    def current_key(self) -> str | None:
        """The key of the row under the cursor, if any."""
        if not self._shown or self.cursor_row < 0 or self.cursor_row >= len(self._shown):
            return None
        return self._shown[self.cursor_row][0]
