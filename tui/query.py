"""The `/` filter: words that name a state filter by state, the rest match run names."""

from __future__ import annotations

from tui.providers.models import STATES, RunQuery

ALIASES = {"done": "COMPLETED", "ok": "COMPLETED", "error": "FAILED", "failed": "FAILED", "canceled": "CANCELLED"}


def parse_filter(text: str, limit: int = 100) -> RunQuery:
    """``failed train`` → state FAILED, text ``train``; ``running`` → state RUNNING only."""
    states: list[str] = []
    words: list[str] = []
    for word in text.split():
        upper = ALIASES.get(word.lower(), word.upper())
        (states if upper in STATES else words).append(upper if upper in STATES else word)
    return RunQuery(" ".join(words), tuple(states), 0, limit)


def describe(query: RunQuery) -> str:
    """The filter in words, for the runs panel's title."""
    parts = [s.lower() for s in query.states] + ([f"'{query.text}'"] if query.text else [])
    return " ".join(parts)
