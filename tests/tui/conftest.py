"""Fixtures for the dashboard's tests: the app on fixed fakes (no GPU, no server, no clock)."""

from __future__ import annotations

import contextlib

import pytest
from textual.worker import WorkerCancelled

from tui.app import make_app
from tui.providers import demo_providers

SLOW_REFRESH = 3600.0  # one fetch at start, then nothing moves: screens are the same every run


@pytest.fixture
def providers():
    """Eight fake GPUs that do not animate, a fake Prefect with 1,000 runs, fake experiments."""
    return demo_providers(runs=1000, animate=False)


@pytest.fixture
def app(providers):
    """The dashboard on the fakes, refreshing only at start."""
    return make_app(providers=providers, refresh_s=SLOW_REFRESH)


@pytest.fixture
def readonly_app(providers):
    """The same, read-only."""
    return make_app(providers=providers, readonly=True, refresh_s=SLOW_REFRESH)


async def settle(pilot, rounds: int = 3) -> None:
    """Let the worker threads post their messages and the screen repaint.

    A fetch the app cancelled on purpose (a new page, filter or action refetches at once) is not
    waited for: ``wait_for_complete`` would raise WorkerCancelled for it, and a test that settled
    just after an action failed now and then.
    """
    for _ in range(rounds):
        for worker in list(pilot.app.workers):
            with contextlib.suppress(WorkerCancelled):
                await worker.wait()
        await pilot.pause()


@pytest.fixture
def anyio_backend():
    """Async tests run on asyncio (anyio's pytest plugin, installed with httpx)."""
    return "asyncio"
