"""The operating system's processes: the one owner of every helper process tunedeck starts.

A helper is a process a tunedeck process starts and keeps beside it: the warm stage server, the
run's DVC session, a stage's reporter, the demo's worker, the Prefect worker under
`tunedeck worker`, the local Prefect server, a node's training process, torchrun under a train
stage. Each is started here (`spawn`), which says whether it is tied to its parent (it gets
SIGTERM when the parent dies, even by kill -9: prctl PR_SET_PDEATHSIG, Linux) or outlives it on
purpose, and stopped here (`Helper.stop`: SIGTERM, a grace, SIGKILL, reaped). Signals a stand-in
passes on (`forward`), a process tree stopped at once (`stop_all`), a pid's liveness (`alive`),
children reaped as soon as they end (`Children`, a pidfd each) live here too. Commands that run
to an end and whose output is the answer (git, `dvc`, `prefect deploy`) are their gateways'.

Light on purpose (no Prefect, no torch): `tunedeck demo` spawns its worker through here before
it imports anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil

TIE = """
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(143)  # the parent died before the line above
os.execvp(sys.argv[2], sys.argv[2:])
"""
"""The helper's first moments on Linux: ask for SIGTERM when the parent dies, then become the helper (exec keeps
the pid). A shim rather than preexec_fn, which is unsafe in a process with threads (a flow run has several)."""


def die_with_parent() -> None:
    """For a process that ties itself to its parent (a DDP rank to its torchrun): SIGTERM when the parent dies."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def tied(cmd: list[str]) -> list[str]:
    """cmd, started so that it gets SIGTERM when this process dies (Linux; elsewhere cmd as it is)."""
    if sys.platform != "linux":
        return list(cmd)
    return [sys.executable, "-I", "-S", "-c", TIE, str(os.getpid()), *cmd]


class Helper:
    """A helper this process started: its pipes, its pid, and how it ends."""

    def __init__(self, proc: subprocess.Popen, group: bool) -> None:
        self.proc, self.group = proc, group

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdin(self) -> Any:
        return self.proc.stdin

    @property
    def stdout(self) -> Any:
        return self.proc.stdout

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def signal(self, signum: int) -> None:
        """signum to the helper (to its whole group when it leads one); nothing if it is gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.group:
                os.killpg(self.proc.pid, signum)
            elif self.proc.poll() is None:
                self.proc.send_signal(signum)

    def stop(self, grace_s: float = 10.0) -> int:
        """SIGTERM, up to grace_s to end, then SIGKILL; reaped. Its exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
        return self.proc.wait()

    def close(self, grace_s: float = 30.0) -> int:
        """For a helper that ends when its stdin closes: close it, wait up to grace_s, then SIGKILL."""
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            code = self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.proc.wait()
        with contextlib.suppress(OSError):
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        return code


def spawn(cmd: list[str], *, tie: bool, group: bool = False, **popen: Any) -> Helper:
    """Start a helper. tie: it gets SIGTERM when this process dies (say why where a helper must outlive its parent).
    group: it leads a session of its own (a terminal's Ctrl-C does not reach it; stop() ends its whole group).
    popen: subprocess.Popen's other arguments (pipes, cwd, env, text)."""
    return Helper(subprocess.Popen(tied(cmd) if tie else list(cmd), start_new_session=group, **popen), group)


def run(cmd: list[str], *, tie: bool, **popen: Any) -> int:
    """A helper run to its end (torchrun under a train stage); its exit status."""
    helper = spawn(cmd, tie=tie, **popen)
    try:
        return helper.wait()
    except BaseException:
        helper.stop()
        raise


def send(pid: int, signum: int) -> bool:
    """signum to pid; False when there is no such process."""
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False


def forward(pid: int, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)) -> None:
    """From now on, these signals to this process go to pid instead (a stand-in for the process doing the work)."""
    for signum in signals:
        signal.signal(signum, lambda number, _frame: send(pid, number))


def alive(pid: int) -> bool:
    """Whether pid is a process (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
        return True
    except PermissionError:
        return True
    except OSError:
        return False


def ended(pid: int) -> bool:
    """Whether pid has ended: reaped here if it is this process's child, else gone or a zombie (someone else's to
    reap)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return not alive(pid)


def stop_all(processes: list[psutil.Process], grace_s: float, kill: bool = True) -> list[psutil.Process]:
    """SIGTERM each, wait up to grace_s, then SIGKILL those still there (unless kill is False); those SIGTERM did
    not end."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(processes, timeout=grace_s)
    if kill:
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(left, timeout=2)
    return left


def stop_group(pid: int, gone, grace_s: float = 15.0, poll_s: float = 0.2) -> None:
    """SIGTERM the process group pid leads (a helper started with group=True, by an earlier process), SIGKILL it
    after grace_s; gone(pid) says when it has ended (it may not be our child: nobody reaps it here)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not gone(pid):
        time.sleep(poll_s)
    if not gone(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


PIDFD = hasattr(os, "pidfd_open")
"""Linux: a child's end is heard at once (a pidfd); elsewhere Children looks every 50 ms."""


class Children:
    """Forked children, each with what its parent keeps for it, reaped as soon as they end; select() also waits on
    other files (a listening socket)."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.kept: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return bool(self.kept)

    def watch(self, fileobj: Any) -> None:
        self.selector.register(fileobj, selectors.EVENT_READ)

    def add(self, pid: int, kept: Any) -> None:
        self.kept[pid] = kept
        if PIDFD:
            self.selector.register(os.pidfd_open(pid), selectors.EVENT_READ, pid)

    def select(self, timeout: float) -> set[Any]:
        """The watched files that are ready, within timeout (sooner when a child ends)."""
        ready = self.selector.select(timeout=timeout if PIDFD else min(timeout, 0.05))
        return {key.fileobj for key, _ in ready if key.data is None}

    def reap(self) -> Iterator[tuple[Any, int]]:
        """(what was kept, its exit status) for each child that ended; a signal's death is 128 + its number."""
        for pid in list(self.kept):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            for key in [k for k in self.selector.get_map().values() if k.data == pid]:
                self.selector.unregister(key.fileobj)
                os.close(key.fd)
            yield self.kept.pop(pid), os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
