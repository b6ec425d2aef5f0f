"""The owner of helper processes (flows.gateways.processes): a tied helper ends with its parent, even by kill -9,
and an untied one outlives it; stop() ends one that ignores SIGTERM; a forked child's end is heard and reaped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from flows.gateways import processes

HANG_S = 60  # a hang guard, not a limit the test asserts


def wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def became(pid: int, last_arg: str) -> bool:
    """The process pid runs the command ending in last_arg (a tied one execs into it, its pid kept)."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        if psutil.Process(pid).cmdline()[-1:] == [last_arg]:
            return True
        time.sleep(0.02)
    return False


PARENT = """
import sys, time
from flows.gateways import processes
helper = processes.spawn([sys.executable, "-c", "import time; time.sleep(600)"], tie=sys.argv[1] == "tie")
print(helper.pid, flush=True)
time.sleep(600)
"""


def test_a_tied_helper_ends_with_its_killed_parent_and_an_untied_one_outlives_it():
    kept = {}
    try:
        for tie in ("tie", "free"):
            parent = subprocess.Popen([sys.executable, "-c", PARENT, tie], stdout=subprocess.PIPE, text=True)
            kept[tie] = int(parent.stdout.readline())
            assert became(kept[tie], "import time; time.sleep(600)"), "the helper is not the command it was given"
            parent.kill()
            parent.wait()
        assert wait_gone(kept["tie"]), "the tied helper outlived its parent's kill -9"
        assert psutil.Process(kept["free"]).is_running(), "the untied helper ended with its parent"
    finally:
        for pid in kept.values():
            processes.send(pid, signal.SIGKILL)


def test_stop_ends_a_helper_that_ignores_sigterm_and_reaps_it():
    helper = processes.spawn([sys.executable, "-c", "import signal, sys, time; signal.signal(signal.SIGTERM, "
                              "signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"], tie=True,
                             stdout=subprocess.PIPE, text=True)
    assert helper.stdout.readline().strip() == "ready"
    assert helper.stop(grace_s=0.2) == -signal.SIGKILL
    assert not psutil.pid_exists(helper.pid)


def test_a_forked_child_is_reaped_with_its_status_or_its_signal():
    children = processes.Children()
    for code, kept in ((3, "exits 3"), (None, "killed")):
        pid = os.fork()
        if pid == 0:
            if code is None:
                time.sleep(600)
            os._exit(code)
        if code is None:
            os.kill(pid, signal.SIGTERM)
        children.add(pid, kept)
    ended = {}
    deadline = time.monotonic() + HANG_S
    while children and time.monotonic() < deadline:
        children.select(timeout=0.5)
        ended.update(children.reap())
    assert ended == {"exits 3": 3, "killed": 128 + signal.SIGTERM}
    assert not children
