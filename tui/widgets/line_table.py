"""A table of laid-out lines: a fixed header and one styled line per keyed row.

For rows that change every second (the GPUs): DataTable re-renders every visible cell
whenever any one cell changes, which made the GPU rows a third of the dashboard's CPU at
1 Hz. Here each row is one ``Text`` laid out by its owner; a row whose text changed is
rendered again and repainted alone, the others come from a cache of strips.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.segment import Segment
from rich.text import Span, Text
from textual import events
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from tui.widgets.keyed_table import fit

LEFT = Segment(" ")  # one cell before each line, as DataTable's cell padding had it
GAP = "  "  # between two columns

Layout = tuple[tuple[int, int], ...]
"""(column index, width) of each column shown, left to right."""


def row_line(cells: tuple, layout: Layout) -> Text:
    """One row's cells laid out in the shown columns' widths as a single line.

    Cut cells end in "…". The line is built as one string plus the styled cells' spans:
    assembling a Text piece by piece cost more than drawing it.
    """
    plain: list[str] = []
    spans: list[Span] = []
    at = 0
    for i, (column, width) in enumerate(layout):
        cell = cells[column]
        if i:
            plain.append(GAP)
            at += len(GAP)
        part = fit(cell, width)
        if isinstance(part, Text):
            text = part.plain
            if part.style:
                spans.append(Span(at, at + len(text), part.style))
            spans += [Span(at + s.start, at + s.end, s.style) for s in part.spans]
        else:
            text = str(part)
        plain.append(text + " " * (width - cell_len(text)))
        at += len(plain[-1])
    line = Text("".join(plain), spans=spans)
    line.rstrip()
    return line


class LineTable(ScrollView, can_focus=True):
    """``show(rows)`` with rows = [(key, Text)]; the cursor row is highlighted while focused (styles: app.tcss)."""

    class ViewportChanged(Message):
        """The vertical scrollbar came or went: the width left for the rows changed."""

    COMPONENT_CLASSES = {"line-table--header", "line-table--cursor"}

    BINDINGS = [
        Binding("up", "cursor(-1)", "up", show=False), Binding("down", "cursor(1)", "down", show=False),
        Binding("pageup", "cursor(-10)", "page up", show=False), Binding("pagedown", "cursor(10)", "page down", show=False),
        Binding("home", "cursor(-1000000)", "first", show=False), Binding("end", "cursor(1000000)", "last", show=False),
    ]

    def __init__(self, header: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.header = Text(header)
        self._keys: list[str] = []
        self._lines: list[Text] = []
        self._strips: dict[int, tuple[Text, bool, Strip]] = {}
        """Row index → (the text, highlighted?, its strip before cropping)."""
        self.cursor_row = 0

    # -- content --

    @property
    def row_count(self) -> int:
        """How many rows (the header not counted)."""
        return len(self._lines)

    def row(self, key: str) -> Text:
        """The line shown for key."""
        return self._lines[self._keys.index(key)]

    @property
    def current_key(self) -> str | None:
        """The key of the row under the cursor, if any."""
        return self._keys[self.cursor_row] if 0 <= self.cursor_row < len(self._keys) else None

    def set_header(self, header: str) -> None:
        """New column labels (the owner laid out other columns)."""
        self.header = Text(header)
        self.refresh()

    def show(self, rows: list[tuple[str, Text]]) -> None:
        """Make the table show rows; same keys in the same order → only the changed rows repaint."""
        keys = [key for key, _ in rows]
        lines = [line for _, line in rows]
        width = max([self.header.cell_len, *(line.cell_len for line in lines)]) + len(LEFT.text)
        if keys == self._keys:
            for i, (new, old) in enumerate(zip(lines, self._lines, strict=True)):
                if new != old:  # an equal text keeps its object, so its cached strip stays valid
                    self._lines[i] = new
                    self._refresh_row(i)
        else:
            current = self.current_key
            self._keys, self._lines = keys, lines
            self._strips.clear()
            self.cursor_row = keys.index(current) if current in keys else min(self.cursor_row, max(0, len(keys) - 1))
            self.refresh()
            self.call_after_refresh(self.move_cursor, self.cursor_row)  # keep it in view
        size = Size(width, len(lines) + 1)
        if size != self.virtual_size:
            self.virtual_size = size  # a layout pass: a new row count or width needs one, a new text does not

    # -- drawing --

    def render_line(self, y: int) -> Strip:
        """Line y of the widget: the header stays on top; rows scroll under it."""
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == 0:
            style = base + self.get_component_rich_style("line-table--header")
            return self._strip(self.header, style).crop_extend(scroll_x, scroll_x + width, style)
        index = y - 1 + scroll_y
        if index >= len(self._lines):
            return Strip.blank(width, base)
        text, highlighted = self._lines[index], index == self.cursor_row and self.has_focus
        style = base + self.get_component_rich_style("line-table--cursor") if highlighted else base
        cached = self._strips.get(index)
        if cached and cached[0] is text and cached[1] == highlighted:
            strip = cached[2]
        else:
            strip = self._strip(text, style)
            self._strips[index] = (text, highlighted, strip)
        return strip.crop_extend(scroll_x, scroll_x + width, style)  # the row's own style fills to the edge

    def _strip(self, text: Text, style) -> Strip:
        """The line as drawn, not yet cut or padded to the width (so a cached one fits any width)."""
        return Strip([LEFT, *text.render(self.app.console)]).apply_style(style)

    def _refresh_row(self, index: int) -> None:
        y = index + 1 - self.scroll_offset.y
        if 1 <= y < self.size.height:
            self.refresh(Region(0, y, self.size.width, 1))

    def notify_style_update(self) -> None:
        """A theme or focus change restyles every line."""
        super().notify_style_update()
        self._strips.clear()

    def on_focus(self) -> None:
        """The cursor row shows while focused."""
        self._refresh_row(self.cursor_row)

    def on_blur(self) -> None:
        """The cursor row hides when the focus leaves."""
        self._refresh_row(self.cursor_row)

    # -- the cursor --

    def action_cursor(self, step: int) -> None:
        """Move the cursor by step rows (clamped) and keep it in view."""
        self.move_cursor(self.cursor_row + step)

    def move_cursor(self, row: int) -> None:
        """Put the cursor on row (clamped) and scroll it into view."""
        old, self.cursor_row = self.cursor_row, max(0, min(row, len(self._lines) - 1))
        if old != self.cursor_row:
            self._refresh_row(old)
            self._refresh_row(self.cursor_row)
        visible = max(1, self.scrollable_content_region.height - 1)
        top = self.scroll_offset.y
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + visible:
            self.scroll_to(y=self.cursor_row - visible + 1, animate=False)

    def on_click(self, event: events.Click) -> None:
        """A click on a row puts the cursor there (on the header or below the rows: nothing)."""
        offset = event.get_content_offset(self)
        index = None if offset is None else offset.y - 1 + self.scroll_offset.y
        if index is not None and offset.y >= 1 and index < len(self._lines):
            self.move_cursor(index)

    def watch_show_vertical_scrollbar(self, shown: bool) -> None:
        """The rows' room changed without a Resize: tell the owner, which may lay its columns out again."""
        self.post_message(self.ViewportChanged())
