"""A deployment whose schedules are all inactive reads as off, and the panel says what `p` will do."""

from __future__ import annotations

import pytest

from tests.tui.conftest import settle
from tui.providers.prefect_parse import deployment
from tui.widgets.deployments_table import DeploymentsTable

pytestmark = pytest.mark.anyio

API = {"id": "d1", "name": "pipeline", "flow_id": "f1", "paused": False, "work_pool_name": "local",
       "schedules": [{"active": False, "schedule": {"cron": "0 3 * * 1"}}]}


def test_inactive_schedules_parse_as_off():
    assert not deployment(API, {"f1": "pipeline"}, {}, {}).schedule_active
    one_on = {**API, "schedules": [*API["schedules"], {"active": True, "schedule": {"interval": 600}}]}
    assert deployment(one_on, {"f1": "pipeline"}, {}, {}).schedule_active
    assert deployment({**API, "schedules": []}, {}, {}, {}).schedule_active, "no schedule is not an off schedule"


async def test_schedule_off_reads_as_off_and_p_is_explained(app, providers):
    async with app.run_test(size=(140, 42)) as pilot:
        await settle(pilot)
        await pilot.press("tab")
        table = app.screen.query_one(DeploymentsTable)
        assert str(table.get_cell("dep-pipeline", "status")) == "off"
        assert table.border_subtitle == "p: resume pipeline's schedule (it is off)"
        await pilot.press("p")  # resuming needs no confirmation
        await settle(pilot)
        assert str(table.get_cell("dep-pipeline", "status")) == "active", "the state the provider reports after p"
        assert table.border_subtitle == "p: pause pipeline's schedule"
        await pilot.press("p", "y")
        await settle(pilot)
        assert str(table.get_cell("dep-pipeline", "status")) == "paused"
        assert table.border_subtitle == "p: resume pipeline"
        await pilot.press("down")
        assert table.border_subtitle == "p: pause train", "train has no schedule"
