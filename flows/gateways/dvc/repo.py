"""DVC's repository read in process: a stage's data version now, and a clone's resolved configuration.

The two questions a run asks of DVC's Python API outside a `dvc` command (data-watch, a run's
workspace); here so that DVC's API has one door (import-linter forbids it elsewhere).
"""

from __future__ import annotations

from pathlib import Path


def data_version_now(stage: str) -> tuple[str, str]:
    """(data.source, its DVC md5 now) for the stage's first dependency, in the working directory's repository;
    DVC's state cache spares rehashing."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        dep = repo.stage.collect(stage)[0].deps[0]
        return dep.def_path, dep.get_hash().value or ""


def resolved_config(clone: Path) -> tuple[str, dict[str, dict]]:
    """(the clone's cache folder, its remotes' sections) as DVC resolves them (relative remote URLs made absolute)."""
    from dvc.config import Config

    resolved = Config(dvc_dir=str(clone / ".dvc"))
    cache_dir = resolved.get("cache", {}).get("dir") or str(clone / ".dvc" / "cache")
    return cache_dir, dict(resolved.get("remote", {}))
