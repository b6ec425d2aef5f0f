"""The checkpoint copy on the DVC remote never shows a reader half a file, nor a pointer that disagrees with the
checkpoint it fetches: a resuming host reads while the training host writes, and that host may die at any step
(CI on 5110b57 read an empty pointer; CI on 71a8b15 fetched epoch 3's checkpoint under a pointer saying 2)."""

from __future__ import annotations

import json
import threading

from dvc.fs import LocalFileSystem

from flows.gateways.dvc.remote import LAST, POINTER, CheckpointMirror, RemoteStore


class Recording(LocalFileSystem):
    """DVC's local filesystem (what a local remote is), which notes every path written in place (not by a rename)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[str] = []

    def pipe_file(self, path, *args, **kwargs):
        self.written.append(path)
        return super().pipe_file(path, *args, **kwargs)

    def put_file(self, source, path, *args, **kwargs):
        self.written.append(path)
        return super().put_file(source, path, *args, **kwargs)


def mirror_on(tmp_path, fs) -> CheckpointMirror:
    mirror = CheckpointMirror(tmp_path / "project", "0123456789abcdef", enabled=True)
    mirror._remote, mirror._resolved = RemoteStore("store", fs, str(tmp_path / "store")), True
    return mirror


def test_the_checkpoint_and_its_pointer_reach_the_remote_only_by_rename(tmp_path):
    fs = Recording()
    mirror = mirror_on(tmp_path, fs)
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (1, 2, 3):
        (run / LAST).write_bytes(bytes([epoch]) * 1000)
        mirror.push(run / LAST, epoch)
        mirror.close()
        mirror._closing, mirror._thread = False, None

    base = tmp_path / "store" / "tunedeck" / "checkpoints" / "0123456789abcdef"
    assert json.loads((base / POINTER).read_text())["epoch"] == 3
    assert (base / "epoch-3.pt").read_bytes() == bytes([3]) * 1000
    assert not [p for p in fs.written if p.endswith((f"/{POINTER}", ".pt"))], fs.written
    assert sorted(p.name for p in base.iterdir()) == ["epoch-3.pt", POINTER], "older epochs stay behind"


def test_a_reader_polling_the_pointer_never_reads_it_torn(tmp_path):
    mirror = mirror_on(tmp_path, LocalFileSystem())
    run = tmp_path / "run"
    run.mkdir()
    pointer = tmp_path / "store" / "tunedeck" / "checkpoints" / "0123456789abcdef" / POINTER
    torn: list[str] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            if pointer.exists():
                text = pointer.read_text()
                try:
                    json.loads(text)
                except ValueError:
                    torn.append(text)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for epoch in range(1, 200):
            (run / LAST).write_bytes(b"x")
            mirror._upload(run / LAST, epoch)
    finally:
        done.set()
        reader.join()
    assert torn == []
    assert json.loads(pointer.read_text())["epoch"] == 199


class DiesBeforeThePointer(LocalFileSystem):
    """A training host that dies after its checkpoint reached the remote, before the pointer was moved."""

    def __init__(self, at_epoch: int) -> None:
        super().__init__()
        self.at_epoch, self.epoch = at_epoch, 0

    def put_file(self, source, path, *args, **kwargs):
        self.epoch = int(path.rsplit("/", 1)[-1].split("-")[1].split(".")[0])
        return super().put_file(source, path, *args, **kwargs)

    def pipe_file(self, path, *args, **kwargs):
        if self.epoch == self.at_epoch:
            raise OSError("the host died here")
        return super().pipe_file(path, *args, **kwargs)


def test_a_host_that_dies_between_checkpoint_and_pointer_leaves_a_pointer_and_the_file_it_names(tmp_path):
    mirror = mirror_on(tmp_path, DiesBeforeThePointer(at_epoch=3))
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (1, 2, 3):
        (run / LAST).write_bytes(bytes([epoch]) * 100)
        mirror._upload(run / LAST, epoch)
    other_host = mirror_on(tmp_path, LocalFileSystem())
    resumed = tmp_path / "other-host"
    assert other_host.fetch(resumed) == 2
    assert (resumed / LAST).read_bytes() == bytes([2]) * 100, "the fetched checkpoint is not the epoch it says"
