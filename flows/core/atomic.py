"""Files replaced whole: a reader (another process, a run resumed after a kill) sees the old file or the new one,
never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable[[Path], object], mode: int | None = None) -> None:
    """write(tmp) to a temporary name beside path, flushed to disk, then renamed over path. mode: the new file's
    permission bits, set before anything is in it (a private key's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if mode is not None:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode))
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
