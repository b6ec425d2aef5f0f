"""The operating system's processes: how a helper process ends with the one that started it.

The one place the parent-death signal is set (prctl PR_SET_PDEATHSIG, Linux): a helper started
with preexec_fn=die_with_parent, or a process that calls it for itself, gets SIGTERM when its
parent dies, even by kill -9. Light on purpose (no Prefect, no torch): `tunedeck demo` spawns its
worker through here before it imports anything heavy.
"""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (stopped, killed), Linux only."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
