"""Helper processes a run or a command starts, and how they end with it.

Light on purpose (no Prefect): `tunedeck demo` spawns its worker through here before it imports
anything heavy.
"""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (stopped, killed), Linux only."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
