"""The door to git: every git command tunedeck runs checks its exit status and fails in one sentence.

host_lock is here too: it orders what git keeps once for all worktrees of a clone (refs under
refs/exps/, tags), which the runs of one clone share.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
from collections.abc import Iterator
from pathlib import Path

from flows.core.errors import TunedeckError


def _run(args: tuple[str, ...], cwd: Path, timeout: float | None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise TunedeckError("git is not installed or not on PATH: install git, then run this again.") from None
    except subprocess.TimeoutExpired:
        raise TunedeckError(f"`git {' '.join(args)}` in {cwd} took over {timeout:.0f} s: check the host reaches "
                            "the git server, then run this again.") from None


def _why(proc: subprocess.CompletedProcess) -> str:
    return " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])[:300] or f"exit status {proc.returncode}"


def git(*args: str, cwd: Path, timeout: float | None = None) -> str:
    """Run git with list arguments, its output; a failure is one sentence (TunedeckError)."""
    proc = _run(args, cwd, timeout)
    if proc.returncode != 0:
        raise TunedeckError(f"`git {' '.join(args)}` in {cwd} failed: {_why(proc)}")
    return proc.stdout


def probe(*args: str, cwd: Path) -> str | None:
    """A question whose "no" is an answer (is this a repository, does this ref exist): the output, or None."""
    proc = _run(args, cwd, None)
    return proc.stdout if proc.returncode == 0 else None


def failure(*args: str, cwd: Path, timeout: float | None = None) -> str | None:
    """Run git for an outcome the caller reports itself (a push, a clean-up): None when it worked, else why."""
    proc = _run(args, cwd, timeout)
    return None if proc.returncode == 0 else _why(proc)


def head(cwd: Path) -> str | None:
    """The commit checked out in cwd, or None when cwd is not a git repository with a commit."""
    out = probe("rev-parse", "--verify", "HEAD", cwd=cwd)
    return out.strip() if out else None


@contextlib.contextmanager
def host_lock(clone: Path, name: str) -> Iterator[None]:
    """An exclusive lock among this clone's runs (fcntl), for what git keeps once for all worktrees.

    `dvc exp save` moves refs every worktree shares (refs/exps/exec/...), so two at once would
    trip over each other; it takes about a second, so the runs take turns.
    """
    lock_path = clone / ".tunedeck" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
