"""The GPU rows' widget: a changed row repaints alone, the cursor moves, scrolls and shows only while focused."""

from __future__ import annotations

import pytest
from rich.text import Text
from textual.app import App, ComposeResult

from tests.tui.conftest import settle
from tui.widgets.line_table import LineTable

pytestmark = pytest.mark.anyio


class Rows(App):
    """One LineTable of 20 rows, 8 lines high, under the dashboard's stylesheet."""

    CSS_PATH = "../../tui/app.tcss"

    def compose(self) -> ComposeResult:
        yield LineTable("KEY  VALUE", id="rows")

    def on_mount(self) -> None:
        table = self.query_one(LineTable)
        table.styles.max_height = 8
        table.show([(f"r{i}", Text(f"r{i:<3} {i}")) for i in range(20)])


def rendered(table: LineTable) -> list[int]:
    """Wrap render_line: the list fills with the y of each line drawn."""
    drawn: list[int] = []
    inner = table.render_line

    def render_line(y: int):
        drawn.append(y)
        return inner(y)

    table.render_line = render_line
    return drawn


async def test_a_changed_row_is_the_only_line_drawn_again():
    app = Rows()
    async with app.run_test(size=(40, 12)) as pilot:
        await settle(pilot)
        table = app.query_one(LineTable)
        drawn = rendered(table)
        rows = [(f"r{i}", Text(f"r{i:<3} {i}")) for i in range(20)]
        rows[3] = ("r3", Text("r3   new", style="bold"))
        table.show(rows)
        await pilot.pause()
        assert drawn == [4], "row 3 sits under the header, on line 4"
        assert str(table.row("r3")) == "r3   new"
        drawn.clear()
        table.show(rows)  # the same texts again
        await pilot.pause()
        assert drawn == []


async def test_the_cursor_scrolls_and_shows_only_while_focused():
    app = Rows()
    async with app.run_test(size=(40, 12)) as pilot:
        await settle(pilot)
        table = app.query_one(LineTable)
        highlight = table.get_component_rich_style("line-table--cursor").bgcolor
        table.blur()
        await pilot.pause()
        assert all(seg.style is None or seg.style.bgcolor != highlight for seg in table.render_line(1))
        table.focus()
        for _ in range(10):
            await pilot.press("down")
        await pilot.pause()
        assert table.current_key == "r10" and table.scroll_offset.y > 0
        y = 10 - table.scroll_offset.y + 1
        line = table.render_line(y)
        assert line.text.strip().startswith("r10") and any(seg.style and seg.style.bgcolor == highlight for seg in line)
        assert table.render_line(0).text.strip().startswith("KEY"), "the header stays on top"
        await pilot.press("home")
        assert table.current_key == "r0" and table.scroll_offset.y == 0


async def test_new_keys_keep_the_cursor_on_its_row():
    app = Rows()
    async with app.run_test(size=(40, 12)) as pilot:
        await settle(pilot)
        table = app.query_one(LineTable)
        table.move_cursor(5)
        table.show([(f"r{i}", Text(f"r{i}")) for i in range(3, 20)])
        await pilot.pause()
        assert table.current_key == "r5" and table.row_count == 17
        table.show([("only", Text("only"))])
        assert table.current_key == "only" and table.row_count == 1
        table.show([])
        assert table.current_key is None and table.row_count == 0


async def test_a_click_puts_the_cursor_on_that_row_and_the_header_is_no_row():
    app = Rows()
    async with app.run_test(size=(40, 12)) as pilot:
        await settle(pilot)
        table = app.query_one(LineTable)
        await pilot.click(LineTable, offset=(3, 3))
        assert table.current_key == "r2"
        await pilot.click(LineTable, offset=(3, 0))
        assert table.current_key == "r2"
