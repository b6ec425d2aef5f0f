"""DVC experiments read back through DVC's Python API: `dvc exp show`'s rows, and an output of an experiment's commit.

In process (DVC is imported once, 1.5 s): a `dvc` command costs its own 1.6 s of start-up each.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from flows.core.errors import TunedeckError


@contextlib.contextmanager
def _in(root: Path):
    """DVC's API reads the repository of the working directory."""
    before = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


def rows(root: Path) -> dict[str, dict]:
    """name -> that experiment's row of `dvc exp show` in root (params, metrics, State, its commit as 'rev')."""
    import dvc.api

    with _in(root):
        return {row["Experiment"]: row for row in dvc.api.exp_show() if row.get("Experiment")}


def read_output(root: Path, path: str, rev: str) -> bytes:
    """The bytes of a DVC-tracked output (e.g. models/model.safetensors) at commit rev, from root's DVC cache."""
    import dvc.api

    try:
        with _in(root):
            return dvc.api.read(path, repo=str(root), rev=rev, mode="rb")
    except Exception as exc:  # noqa: BLE001 - DVC's errors vary; say which file of which commit
        raise TunedeckError(f"DVC could not read {path} at commit {rev[:12]} in {root}: {exc}") from None
