"""The gateway to DVC's Python API for what tunedeck reads and writes beyond `dvc repro`.

Checkpoints follow their run: each epoch's checkpoint is copied to the project's default DVC
remote, under ``tunedeck/checkpoints/<run key>/`` (beside DVC's content-addressed ``files/``),
so a run started again on another host, with the same params, data and starting weights,
fetches it and resumes there. The copy runs in a background thread, newest first: an upload
still going when the next epoch ends is not queued behind (only the newest checkpoint
matters), and a remote that is slow or down never slows or stops training (one warning).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("tunedeck")
CHECKPOINTS_ON_REMOTE = ("tunedeck", "checkpoints")
LAST = "last.pt"
POINTER = "last.json"  # {"epoch": k, "bytes": n, "file": "epoch-k.pt"}: the commit point (below)


@dataclass(frozen=True)
class RemoteStore:
    """A DVC remote as a filesystem: its name, DVC's filesystem object for it, and its root path there."""

    name: str
    fs: Any
    path: str


def default_remote(root: Path) -> RemoteStore | None:
    """The project's default DVC remote, or None when none is configured.

    From DVC's config and filesystem API alone, not a Repo: this runs inside a stage that DVC is
    executing, which holds the repo's locks (and DVC's queue runs two such stages at once).
    """
    from dvc.config import Config
    from dvc.fs import get_cloud_fs

    config = Config(dvc_dir=str(Path(root) / ".dvc"))
    name = config["core"].get("remote")
    if not name:
        return None
    cls, fs_config, path = get_cloud_fs(config, name=name)
    return RemoteStore(name, cls(**fs_config), path)


class CheckpointMirror:
    """The run's checkpoints on the DVC remote: push each epoch's (in the background), fetch one to resume."""

    def __init__(self, root: Path, key16: str, enabled: bool = True) -> None:
        """enabled: the process's checkpoint_remote setting (off: checkpoints stay on this host)."""
        self.root, self.key16 = root, key16
        self.enabled = enabled
        self._remote: Any | None = None
        self._resolved = False
        self._lookup = threading.Lock()
        self._pending: tuple[Path, int] | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.pushed: list[int] = []
        self.warned = False

    # --- the remote --------------------------------------------------------------------------
    def remote(self) -> Any | None:
        """The default remote, looked up once (fetch and push threads may ask at the same time)."""
        with self._lookup:
            if self._resolved:
                return self._remote
            self._resolved = True
            if self.enabled:
                try:
                    self._remote = default_remote(self.root)
                except Exception as exc:  # noqa: BLE001 - a broken remote config: train on, say so once
                    self._warn(f"the DVC remote is not usable ({type(exc).__name__}: {exc})")
        return self._remote

    def _dir(self) -> str:
        remote = self._remote
        return remote.fs.join(remote.path, *CHECKPOINTS_ON_REMOTE, self.key16)

    def where(self) -> str:
        """The remote's name and this run's folder on it, for log lines."""
        return f"DVC remote '{self._remote.name}' ({self._dir()})" if self._remote is not None else "no DVC remote"

    def _warn(self, why: str) -> None:
        if not self.warned:
            self.warned = True
            log.warning("checkpoints stay on this host only: %s; training goes on.", why)

    # --- fetch to resume ------------------------------------------------------------------------
    def fetch_soon(self, folder: Path) -> None:
        """fetch() in a thread, while the stage builds its model; wait_fetched() before reading checkpoints."""
        self._fetcher = threading.Thread(target=self.fetch, args=(folder,), name="tunedeck-checkpoint-fetch", daemon=True)
        self._fetcher.start()

    def wait_fetched(self, timeout: float = 120.0) -> None:
        """Until a fetch_soon() has finished (a no-op without one); one that hangs is given up after timeout."""
        fetcher = getattr(self, "_fetcher", None)
        if fetcher is not None:
            fetcher.join(timeout)
            if fetcher.is_alive():
                self._warn(f"fetching a checkpoint from the {self.where()} took over {timeout:.0f} s; starting here")

    def fetch(self, folder: Path) -> int | None:
        """Bring the remote's newest checkpoint of this run into folder when folder has none; its epoch, or None."""
        if (folder / LAST).exists() or self.remote() is None:
            return None
        fs, base = self._remote.fs, self._dir()
        partial = folder / f".{LAST}.fetch-{os.getpid()}"
        for attempt in range(2):  # the file the pointer named may be pruned by a newer push meanwhile: read again
            try:
                pointer = json.loads(fs.cat_file(fs.join(base, POINTER)))
            except FileNotFoundError:
                return None
            except Exception as exc:  # noqa: BLE001 - unreachable remote: start here, from scratch
                self._warn(f"could not read the {self.where()} ({type(exc).__name__})")
                return None
            folder.mkdir(parents=True, exist_ok=True)
            tic = time.perf_counter()
            try:
                fs.get_file(fs.join(base, pointer.get("file", LAST)), str(partial))  # no "file": a remote of before
                break
            except FileNotFoundError:
                partial.unlink(missing_ok=True)
                if attempt == 0:
                    continue
                self._warn(f"the checkpoint on the {self.where()} moved while it was fetched")
                return None
            except Exception as exc:  # noqa: BLE001
                partial.unlink(missing_ok=True)
                self._warn(f"could not fetch the checkpoint from the {self.where()} ({type(exc).__name__})")
                return None
        os.replace(partial, folder / LAST)
        log.info("fetched the checkpoint of epoch %d from the %s in %.1f s", pointer["epoch"], self.where(),
                 time.perf_counter() - tic)
        return int(pointer["epoch"])

    # --- push each epoch -------------------------------------------------------------------------
    def push(self, path: Path, epoch: int) -> None:
        """Copy this checkpoint (epochs done: epoch) to the remote soon; a newer one replaces it if still waiting."""
        if not self.enabled:
            return
        snapshot = path.with_name(f".push-{epoch}-{os.getpid()}.pt")
        with contextlib.suppress(FileNotFoundError):
            snapshot.unlink()
        try:
            os.link(path, snapshot)  # the trainer renames a new last.pt over this one next epoch
        except OSError:
            return
        with self._wake:
            if self._pending is not None:
                self._pending[0].unlink(missing_ok=True)
            self._pending = (snapshot, epoch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._uploads, name="tunedeck-checkpoint-push", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _uploads(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closing:
                    self._wake.wait()
                if self._pending is None:
                    return
                snapshot, epoch = self._pending
                self._pending = None
            try:
                self._upload(snapshot, epoch)
            finally:
                snapshot.unlink(missing_ok=True)

    def _upload(self, snapshot: Path, epoch: int) -> None:
        if self.remote() is None:
            return
        fs, base = self._remote.fs, self._dir()
        name = f"epoch-{epoch}.pt"
        try:
            fs.makedirs(base, exist_ok=True)
            fs.put_file(str(snapshot), fs.join(base, f"{name}.partial"))
            fs.mv(fs.join(base, f"{name}.partial"), fs.join(base, name))
            # the pointer names the file and its epoch together, and moving it is the commit point: a host that
            # dies between two steps leaves the last pointer and the file it names (with one last.pt, replaced
            # before its pointer, a resuming host read epoch k and trained on from k+1: CI on 71a8b15). Every
            # write goes through a rename: a plain one truncates first, and a reader then read an empty pointer
            fs.pipe_file(fs.join(base, f"{POINTER}.partial"),
                         json.dumps({"epoch": epoch, "bytes": snapshot.stat().st_size, "file": name}).encode())
            fs.mv(fs.join(base, f"{POINTER}.partial"), fs.join(base, POINTER))
            self.pushed.append(epoch)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"pushing to the {self.where()} failed ({type(exc).__name__}: {str(exc)[:120]})")
            return
        for older in fs.find(base):  # the epochs the pointer no longer names (a reader that read it may retry)
            if older.rsplit("/", 1)[-1] not in (name, POINTER) and not older.endswith(".partial"):
                with contextlib.suppress(Exception):
                    fs.rm_file(older)

    def close(self, timeout: float = 300.0) -> None:
        """Wait (bounded) for the newest checkpoint to reach the remote."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._warn(f"the last checkpoint was still uploading after {timeout:.0f} s")
        if self.pushed:
            log.info("checkpoint of epoch %d pushed to the %s", self.pushed[-1], self.where())
