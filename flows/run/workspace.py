"""A run's own workspace: a git worktree of the worker's clone at its commit, sharing its DVC cache.

Why a git worktree, not DVC's temp executors (`dvc exp run --temp`, the queue): the pipeline
runs its stages one by one as Prefect tasks, and DVC's executors run a whole `dvc repro` in one
go and hold the clone's DVC lock for the whole run (two at once wait for each other), or need
DVC's own celery queue beside Prefect's workers. A worktree is a checkout of the run's commit
(tracked files only, a fraction of a second), shares git's objects and refs with the clone, so
`dvc exp save` there is an experiment that `dvc exp show` in the clone lists, and it is gone
with `git worktree remove`. What each run needs that git does not hold:
- the DVC cache: the clone's, shared (links into the workspace, never copies of the data);
- the DVC remotes with the clone's local settings (credentials), relative URLs made absolute;
- starting weights under weights/ (git-ignored): hard links;
- a data.source folder that neither git nor DVC tracks: a link to the clone's (read only).
Nothing in the clone is written: no params.yaml, output or lock of a run is shared with another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import get_run_logger

from flows.gateways.git import failure, git, host_lock
from flows.run.overrides import apply_overrides

WORKSPACES = Path(".tunedeck") / "workspaces"
LINK_TYPES = "reflink,hardlink,symlink,copy"  # what DVC checks out with: links first, a copy only where none works


def create(clone: Path, name: str) -> Path:
    """A new worktree of clone's HEAD at clone/.tunedeck/workspaces/<name>, set up to run the pipeline."""
    clone = clone.resolve()
    path = clone / WORKSPACES / name
    with host_lock(clone, "worktrees"):  # git reads every worktree's files: one being added or removed fails it
        _remove_orphans(clone)
        if path.exists():  # a run of this id that was killed: start it clean
            _remove(clone, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", "--force", str(path), "HEAD", cwd=clone)
        path.with_name(f"{name}.pid").write_text(str(os.getpid()))
    write_dvc_config(clone, path)
    link_weights(clone, path)
    return path


def write_dvc_config(clone: Path, path: Path) -> None:
    """path/.dvc/config.local: the clone's cache (shared, linked out) and its remotes as the clone resolves them."""
    from configobj import ConfigObj

    from flows.gateways.dvc.repo import resolved_config

    cache_dir, remotes = resolved_config(clone)  # relative remote URLs come back absolute
    local = ConfigObj(str(path / ".dvc" / "config.local"))
    local["cache"] = {"dir": str(Path(cache_dir).resolve()), "type": LINK_TYPES}
    for name, remote in remotes.items():
        section = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in remote.items()
                   if v is not None and not isinstance(v, dict | list)}
        local[f'remote "{name}"'] = section
    local.write()


def link_weights(clone: Path, path: Path) -> None:
    """Hard links (copies where links fail) of the clone's untracked weights files."""
    source = clone / "weights"
    if not source.is_dir():
        return
    for item in source.iterdir():
        target = path / "weights" / item.name
        if item.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(item, target)
            except OSError:
                shutil.copy2(item, target)


def link_untracked_source(clone: Path, path: Path, source: str) -> None:
    """data.source as a link to the clone's folder when it is in the clone and neither git nor DVC brought it here."""
    if Path(source).is_absolute() or (path / source).exists() or (path / f"{source}.dvc").exists():
        return
    if (clone / source).is_dir():
        (path / source).parent.mkdir(parents=True, exist_ok=True)
        (path / source).symlink_to(clone / source, target_is_directory=True)


def source_links(path: Path) -> list[str]:
    """The links link_untracked_source made in workspace path (data.source, when neither git nor DVC brought it)."""
    import yaml

    try:
        source = str((yaml.safe_load((path / "params.yaml").read_text()) or {}).get("data", {}).get("source") or "")
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [source] if source and not Path(source).is_absolute() and (path / source).is_symlink() else []


def tracks_dvc_data(path: Path) -> bool:
    """Whether the commit has anything for `dvc checkout` to bring: a .dvc file or a dvc.lock (git's index, no DVC)."""
    return bool(git("ls-files", "--", "*.dvc", "dvc.lock", cwd=path).strip())


def remove(clone: Path, path: Path) -> None:
    """The worktree and its folder gone; the clone's own files untouched. Under the clone's worktree lock: a
    `git worktree add` of another run reads every registered worktree's files, and one half removed (or half
    added) fails it ("fatal: failed to read .git/worktrees/<id>/commondir", seen in CI with two runs at once)."""
    with host_lock(clone, "worktrees"):
        _remove(clone, path)


def _remove(clone: Path, path: Path) -> None:
    if failure("worktree", "remove", "--force", "--force", str(path), cwd=clone) and path.exists():
        shutil.rmtree(path, ignore_errors=True)
    failure("worktree", "prune", cwd=clone)  # what it did not prune, the next run's _remove_orphans does
    path.with_name(f"{path.name}.pid").unlink(missing_ok=True)


def _remove_orphans(clone: Path) -> None:
    """Remove the workspaces of runs whose process is gone (killed with kill -9: nobody removed theirs); the caller
    holds the worktree lock."""
    import psutil

    for pid_file in (clone / WORKSPACES).glob("*.pid"):
        try:
            alive = psutil.pid_exists(int(pid_file.read_text()))
        except (OSError, ValueError):
            alive = False
        if not alive:
            _remove(clone, pid_file.with_suffix(""))


@contextlib.contextmanager
def run_workspace(clone: Path, overrides: list[str]) -> Iterator[Path]:
    """The run's own worktree of the clone, with the overrides in its params.yaml; removed at the end.

    A bad override fails here, in one sentence, before any stage runs (the workspace goes with it).
    """
    import yaml

    logger = get_run_logger()
    tic = time.perf_counter()
    ws = create(clone, run_id())
    try:
        apply_overrides(ws / "params.yaml", overrides)
        source = yaml.safe_load((ws / "params.yaml").read_text())["data"]["source"]
        link_untracked_source(clone, ws, source)
        logger.info(f"isolation: workspace {ws} set up in {time.perf_counter() - tic:.2f} s")
        yield ws
    finally:
        timed("workspace removed", lambda: remove(clone, ws))


def timed(what: str, work) -> None:
    """Do work, then log `isolation: <what> in <seconds> s` (bench/deploy_latency.py adds these up)."""
    tic = time.perf_counter()
    work()
    get_run_logger().info(f"isolation: {what} in {time.perf_counter() - tic:.2f} s")


def run_id() -> str:
    """This flow run's id (a local run outside Prefect's engine: a fresh one)."""
    import uuid

    from prefect.runtime import flow_run

    return flow_run.id or uuid.uuid4().hex


def run_name() -> str:
    """This flow run's name, the name of its DVC experiment."""
    from prefect.runtime import flow_run

    return flow_run.name or run_id()[:8]
