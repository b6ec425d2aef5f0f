"""Checkpoints that survive a kill -9: atomic writes, last + previous + top-N, exact resume.

A checkpoint holds everything an uninterrupted run would still have in memory: model,
optimizer, scheduler, scaler and EMA states, epoch and step, the position in the epoch's
batch order, every RNG state, and the run key (a hash of what defines the run), so a
checkpoint of another run is never resumed.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("tunedeck")
LAST, PREVIOUS = "last.pt", "previous.pt"


def _write_synced(path: Path, state: dict[str, Any]) -> Path:
    """state saved to a temp file beside path, flushed to disk; returns the temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _sync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """Every random state training draws from."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(), "gen": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], gen: torch.Generator) -> None:
    """Put back the random states rng_state() captured."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: Path, state: dict[str, Any]) -> Path:
    """Save state as last.pt, keeping the one before as previous.pt."""
    last = folder / LAST
    fresh = _write_synced(last, state)  # the slow part, before anything is renamed
    if last.exists():
        os.replace(last, folder / PREVIOUS)
    os.replace(fresh, last)
    _sync_dir(folder)
    return last


def load_resumable(folder: Path, run_key: str) -> dict[str, Any] | None:
    """The newest readable checkpoint of this run, or None; a corrupt one is reported and skipped."""
    for name in (LAST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any failure to read means the file is unusable
            log.warning("checkpoint %s is unreadable (%s); trying the previous good one.", path, type(exc).__name__)
            continue
        if state.get("run_key") != run_key:
            log.info("checkpoint %s belongs to other params or data; starting afresh.", path)
            return None
        state["path"] = str(path)
        return state
    return None


def keep_top(folder: Path, last: Path, epoch: int, score: float, n: int) -> None:
    """Keep last in top/ if its score is among the n best; drop the rest.

    A hard link, not a copy: save() never writes into last.pt, it renames a new file over it,
    so the linked file keeps this epoch's contents. (A checkpoint is model, optimizer and best
    weights, about 4x the model: a copy per epoch was most of a short epoch's time.)
    """
    top = folder / "top"
    top.mkdir(parents=True, exist_ok=True)
    kept = top / f"epoch{epoch + 1:04d}_score{score:.6f}.pt"
    kept.unlink(missing_ok=True)
    try:
        os.link(last, kept)
    except OSError:  # a file system without hard links
        shutil.copy2(last, kept)
    ranked = sorted(top.glob("epoch*_score*.pt"), key=lambda p: float(p.stem.split("_score")[1]), reverse=True)
    for extra in ranked[n:]:
        extra.unlink()


def clear(folder: Path) -> None:
    """Remove every checkpoint (a new run starts)."""
    if folder.exists():
        shutil.rmtree(folder)
