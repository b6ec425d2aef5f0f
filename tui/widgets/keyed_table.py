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


def columns_that_fit(widths: Sequence[tuple[str, int]], drop_order: Sequence[str], room: int, gap: int) -> list[str]:
    """The keys of the columns that fit in room cells (each one's width plus gap), drop_order's dropped first."""
    keep = dict(widths)
    for key in drop_order:
        if sum(keep.values()) + gap * len(keep) <= room:
            break
        keep.pop(key, None)
    return list(keep)


class KeyedTable(DataTable):
    """DataTable with ``show(rows)``: rows = [(key, cells)], diffed against what is on screen.

    A narrow table drops columns in ``drop_order`` until the rest fit beside its scrollbar
    (a tmux split of 80 columns keeps what matters most); rows always carry every column's cell.
    """

    DEFAULT_CSS = ""

    def __init__(self, columns: Sequence[tuple[str, str, int | None]], drop_order: Sequence[str] = (), **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self._all_columns = list(columns)
        self._columns = list(columns)
        """The columns on screen."""
        self._indices = list(range(len(columns)))
        """Where each column on screen is in the rows' cells."""
        self._drop_order = drop_order
        self._rows: list[tuple[str, tuple]] = []
        """The last rows given, every column's cell."""
        self._shown: list[tuple[str, tuple]] = []

    def on_mount(self) -> None:
        """Add the columns once."""
        self._add_columns()

    def _add_columns(self) -> None:
        for label, key, width in self._columns:
            self.add_column(label, key=key, width=width)

    def on_resize(self) -> None:
        """Show the columns that fit the new width."""
        if not self._drop_order:
            return
        widths = [(key, width or 0) for _, key, width in self._all_columns]
        kept = columns_that_fit(widths, self._drop_order, self.scrollable_content_region.width, 2 * self.cell_padding)
        keep = [column for column in self._all_columns if column[1] in kept]
        if keep != self._columns:
            current = self.current_key
            self._columns = keep
            self._indices = [i for i, column in enumerate(self._all_columns) if column in keep]
            self.clear(columns=True)
            self._add_columns()
            self._shown = []
            self.show(self._rows)
            if current in self.rows:
                self.move_cursor(row=self.get_row_index(current), animate=False)

    def show(self, rows: list[tuple[str, tuple]]) -> None:
        """Make the table show rows; same keys in the same order → only changed cells are updated."""
        self._rows = rows
        rows = [(key, tuple(fit(cells[i], self._all_columns[i][2]) for i in self._indices)) for key, cells in rows]
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
