"""The prepare stage's work: validate the source, split it, store it decoded once."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.contracts import PrepareManifest
from flows.core.errors import TunedeckError
from flows.core.images import class_files, decode_stream
from flows.core.params import Params, save_resolved
from flows.core.split import stratified_split


@dataclass(frozen=True)
class PrepareResult:
    """What prepare produced: class names, split sizes, the data version and rejected files."""

    classes: tuple[str, ...]
    counts: dict[str, int]
    data_version: str
    rejected: int


CHUNK_ROWS = 256  # images copied at a time from the decoded file into the splits' files


def prepare(params: Params, out: Path, progress=None) -> PrepareResult:
    """Decode params.data.source into out/{split}_x.npy (uint8 NHWC) and {split}_y.npy.

    val and test are stored at data.image_size, as predict decodes; train at data.store_size when
    set (larger, so training can take random-resized crops from it, as timm's transform does).

    Memory does not grow with the data set: images are decoded in a bounded window and appended
    to a file, then copied into the splits' .npy files a chunk at a time (no array of all the
    images is ever built; a million images need the disk, not the RAM).
    """
    data = params.data
    table = declared_groups(data)  # checked before anything is decoded or written
    out.mkdir(parents=True, exist_ok=True)
    sizes = stored_sizes(data)  # (train's, val/test's): train larger when data.store_size asks for it
    staged = [out / f".decoded-{size}.tmp" for size in sizes]
    try:
        with contextlib.ExitStack() as stack:
            sinks = [stack.enter_context(open(path, "wb")) for path in staged]

            def write(images) -> None:
                for sink, image in zip(sinks, images, strict=True):
                    sink.write(image.tobytes())

            decoded = decode_stream(Path(data.source), sizes, write, progress=progress)
        split = stratified_split(
            decoded.labels, data.val_fraction, data.test_fraction, params.base.seed, data.limit_per_class
        )
        if table is not None and data.train_without:  # those groups' images stay out of training only
            split["train"] = table.kept(split["train"], [decoded.paths[i] for i in split["train"]], data.train_without)
        if not len(split["test"]):
            raise TunedeckError(
                f"data.test_fraction {data.test_fraction} leaves no test image ({len(decoded.labels)} images in all): raise it."
            )
        if len(sizes) == 1:
            write_splits(staged[0], split, decoded.labels, sizes[0], out)
        else:
            write_splits(staged[0], {"train": split["train"]}, decoded.labels, sizes[0], out)
            write_splits(staged[1], {k: v for k, v in split.items() if k != "train"}, decoded.labels, sizes[1], out)
    finally:
        for path in staged:
            path.unlink(missing_ok=True)
    counts = {name: int(len(idx)) for name, idx in split.items()}
    PrepareManifest(
        source=data.source, data_version=decoded.version, classes=list(decoded.classes), image_size=data.image_size,
        counts=counts, per_class={
            name: {cls: int((decoded.labels[idx] == i).sum()) for i, cls in enumerate(decoded.classes)}
            for name, idx in split.items()
        },
    ).write(out)
    if table is not None:
        from flows.core.groups import save

        save(table, {name: [decoded.paths[i] for i in idx] for name, idx in split.items()}, out)
    else:
        (out / "groups.json").unlink(missing_ok=True)  # one left by an earlier run would describe other data
    report = [{"path": r.path, "reason": r.reason} for r in decoded.rejected]
    (out / "rejected.json").write_text(json.dumps(report, indent=2))
    save_resolved(params, out)
    return PrepareResult(decoded.classes, counts, decoded.version, len(report))


def declared_groups(data):
    """data.groups' CSV, checked against the source's files (flows.core.groups.GroupTable), or None."""
    if data.groups is None:
        return None
    from flows.core.groups import read_groups

    files = [path.relative_to(data.source).as_posix() for _, path in class_files(Path(data.source))]
    table = read_groups(Path(data.source), data.groups, files, data.group_min_images)
    table.without(data.train_without)  # names groups the CSV has
    return table


def stored_sizes(data) -> tuple[int, ...]:
    """The sides images are stored at: (train's, val/test's) with data.store_size, else (image_size,)."""
    if data.store_size is None or data.store_size == data.image_size:
        return (data.image_size,)
    return (data.store_size, data.image_size)


def write_splits(staged: Path, split: dict[str, np.ndarray], labels: np.ndarray, size: int, out: Path) -> None:
    """Copy each row of the staged images (raw uint8, size x size x 3 each) into its split's .npy, in order."""
    row_bytes = size * size * 3
    which = np.full(len(labels), -1, dtype=np.int64)  # the split of each row (-1: left out by limit_per_class)
    names = list(split)
    for i, name in enumerate(names):
        which[split[name]] = i
    files = []
    try:
        for name in names:
            f = open(out / f"{name}_x.npy", "wb")
            files.append(f)
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (len(split[name]), size, size, 3)})
        with open(staged, "rb") as source:
            for start in range(0, len(labels), CHUNK_ROWS):
                chunk = np.frombuffer(source.read(row_bytes * CHUNK_ROWS), dtype=np.uint8).reshape(-1, row_bytes)
                owners = which[start:start + len(chunk)]
                for i, f in enumerate(files):
                    f.write(chunk[owners == i].tobytes())
    finally:
        for f in files:
            f.close()
    for name, idx in split.items():
        np.save(out / f"{name}_y.npy", labels[idx])


def load_split(folder: Path, name: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One stored split: images (N, H, W, 3) uint8 and labels (N,)."""
    mode = "r" if mmap else None
    return np.load(folder / f"{name}_x.npy", mmap_mode=mode), np.load(folder / f"{name}_y.npy")


def load_manifest(folder: Path) -> PrepareManifest:
    """The manifest prepare wrote: classes, counts, image size and data version (one sentence if broken)."""
    return PrepareManifest.read(folder)


@dataclass(frozen=True)
class Splits:
    """The images (uint8 NHWC) and labels a run trains and validates on: the prepare stage's, or a silo's own."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray

    @classmethod
    def load(cls, prepared: Path) -> Splits:
        return cls(*load_split(prepared, "train"), *load_split(prepared, "val"))

    @classmethod
    def train_only(cls, x: np.ndarray, y: np.ndarray) -> Splits:
        return cls(x, y, x[:0], y[:0])
