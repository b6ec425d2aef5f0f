"""flows.run.slot_lease against a scripted server: a slot is kept through an outage, and taken again when the lease is
gone; one line says which (the end-to-end case, a real server killed and restarted: tests/integration/test_faults.py)."""

from __future__ import annotations

import contextlib
import threading
import uuid

import httpx
import pytest

from flows.gateways import prefect_api
from flows.run import slot_lease
from flows.run.slot_lease import SlotLease


class ScriptedServer:
    """Answers each call with the next scripted outcome: "ok", "down" (refused), "gone" (410), "taken" (423)."""

    def __init__(self, renewals: list[str], increments: list[str]) -> None:
        self.renewals, self.increments = renewals, increments
        self.calls: list[str] = []
        self.released: list[uuid.UUID] = []
        self.done = threading.Event()

    def _answer(self, script: list[str], what: str) -> httpx.Response:
        outcome = script.pop(0) if script else "ok"
        self.calls.append(f"{what}:{outcome}")
        if not self.renewals and not self.increments:
            self.done.set()
        request = httpx.Request("POST", "http://server/api")
        if outcome == "down":
            raise httpx.ConnectError("refused", request=request)
        code = {"ok": 200, "gone": 410, "taken": 423}[outcome]
        response = httpx.Response(code, request=request, json={"lease_id": str(uuid.uuid4())})
        response.raise_for_status()
        return response

    def increment_concurrency_slots_with_lease(self, **_) -> httpx.Response:
        return self._answer(self.increments, "take")

    def renew_concurrency_lease(self, **_) -> httpx.Response:
        return self._answer(self.renewals, "renew")

    def release_concurrency_slots_with_lease(self, lease_id: uuid.UUID) -> None:
        self.released.append(lease_id)


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, text: str) -> None:
        self.lines.append(text)


@pytest.fixture
def scripted(monkeypatch):
    def install(renewals: list[str], increments: list[str]) -> ScriptedServer:
        fake = ScriptedServer(renewals, increments)
        monkeypatch.setattr(prefect_api, "_client", lambda client=None: contextlib.nullcontext(fake))  # its gateway's
        monkeypatch.setattr(slot_lease, "RETRY_S", 0.001)
        return fake
    return install


def hold(fake: ScriptedServer) -> tuple[uuid.UUID, SlotLease, Lines]:
    """Take the slot, wait until the script has been played, release it; the first lease's id."""
    lines = Lines()
    lease = SlotLease("gpu0", "GPU 0", lease_s=0.006, logger=lines, run_id=str(uuid.uuid4()))  # renew every 1 ms
    assert lease.take()
    first = lease.lease_id
    assert fake.done.wait(10), fake.calls  # a hang guard: the script is a few calls of 1 ms each
    lease.release()
    return first, lease, lines


def test_an_outage_keeps_the_same_lease_and_says_so(scripted):
    fake = scripted(renewals=["ok", "down", "down", "down", "ok"], increments=["ok"])
    first, lease, lines = hold(fake)
    assert fake.calls[:6] == ["take:ok", "renew:ok", "renew:down", "renew:down", "renew:down", "renew:ok"]
    assert [line for line in lines.lines if "unreachable" in line][0].endswith("GPU 0's slot was kept and the run went on")
    assert fake.released == [first] and lease.lease_id == first


def test_a_lease_the_server_lost_is_taken_again_and_the_new_one_released(scripted):
    fake = scripted(renewals=["down", "gone"], increments=["ok", "taken", "ok"])
    first, lease, lines = hold(fake)
    assert fake.calls[:5] == ["take:ok", "renew:down", "renew:gone", "take:taken", "take:ok"]
    assert any("GPU 0's slot was re-taken" in line for line in lines.lines), lines.lines
    assert any("given to another run" in line for line in lines.lines), lines.lines
    assert fake.released == [lease.lease_id] and lease.lease_id != first, "the new lease is the one freed"


def test_a_taken_slot_is_not_held(scripted):
    fake = scripted(renewals=[], increments=["taken"])
    lease = SlotLease("gpu0", "GPU 0", lease_s=60, logger=Lines())
    assert not lease.take() and lease.lease_id is None and fake.calls == ["take:taken"]
