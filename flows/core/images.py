"""Scan an image folder (one sub-folder per class), validate and decode every image once.

The source folder is only ever read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from flows.core.errors import TunedeckError


@dataclass(frozen=True)
class Rejected:
    """A file left out of the data set, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Decoded:
    """The images that decoded, as one uint8 array, with their labels."""

    classes: tuple[str, ...]
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    rejected: tuple[Rejected, ...]
    version: str  # the folder's md5 as DVC computes it ("<md5>.dir")


def list_class_folders(source: Path) -> list[Path]:
    """The class sub-folders of source, sorted; raise TunedeckError if there is no usable folder."""
    what = f"data.source '{source}'"
    if not source.exists():
        raise TunedeckError(
            f"{what} does not exist: point data.source in params.yaml at a folder with one "
            "sub-folder of images per class (run `tunedeck demo` to make an example)."
        )
    if not source.is_dir():
        raise TunedeckError(f"{what} is a file, not a folder: point it at a folder with one sub-folder per class.")
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise TunedeckError(
            f"{what} has no class sub-folders: put the images of each class in a sub-folder named after it."
        )
    return folders


def folder_version(source: Path, known: dict[Path, str] | None = None) -> str:
    """The md5 DVC gives this folder (md5 of its sorted file list), so versions match dvc.lock.

    known: files' md5s already computed (prepare hashes each image as it decodes it, from the
    same bytes); only the other files are read here.
    """
    known = known or {}
    entries = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        md5 = known.get(path) or hashlib.md5(path.read_bytes()).hexdigest()
        entries.append({"md5": md5, "relpath": path.relative_to(source).as_posix()})
    entries.sort(key=lambda e: tuple(e["relpath"].split("/")))
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one image to (size, size, 3) uint8: shorter side resized to size, centre crop.

    Raises ValueError with a short reason when the file is empty, truncated, not an image, or
    has more pixels than Pillow decodes safely (its decompression-bomb guard).
    """
    return decode_sizes(path, (size,))[0]


def decode_sizes(path: Path, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """path decoded to each size in sizes, each exactly as decode_image() does (prepare stores train larger than val/test).

    The file is read once; each size decodes on its own, so the val/test copy is pixel for pixel
    what predict's decode_image() makes of the same file.
    """
    return decode_bytes(path.read_bytes(), sizes)


def decode_bytes(data: bytes, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """A file's bytes decoded to each size in sizes (decode_sizes() without the read)."""
    return [square(load_rgb(data, size), size) for size in sizes]


def load_rgb(data: bytes, size: int) -> Image.Image:
    """A file's bytes as an RGB image; a JPEG is decoded at a reduced scale (libjpeg's DCT scaling) when size allows.

    JPEG's draft mode decodes at 1/2, 1/4 or 1/8 of the full size while both sides stay >= size,
    so a 500x375 photo for 64 px costs a quarter of the work; the resize to size follows.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(too_many_pixels(str(exc))) from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"broken image ({exc})") from None


def square(rgb: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: shorter side resized to size (bicubic), centre crop."""
    scale = size / min(rgb.size)
    resized = rgb.resize((max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)


def too_many_pixels(message: str) -> str:
    """The reason for an image over Pillow's pixel limit, from the DecompressionBombError's message.

    Such a file (a scanner's panorama, or a crafted bomb: 16,000 x 16,000 pixels fit in 32 KB)
    is refused before its pixels are decoded, so it never costs the memory it would take.
    """
    pixels, limit = re.search(r"\((\d+) pixels\)", message), re.search(r"limit of (\d+)", message)
    size = f"{int(pixels[1]) / 1e6:,.0f} megapixels, over the limit of {int(limit[1]) / 1e6:,.0f}" if pixels and limit else message
    return f"too large to decode safely ({size}: Pillow's decompression-bomb guard); downscale it to use it"


@dataclass(frozen=True)
class Streamed:
    """What decode_stream() wrote: the images went to a file, in row order; the labels stay here."""

    classes: tuple[str, ...]
    labels: np.ndarray  # (N,) int64, one per row written
    rejected: tuple[Rejected, ...]
    version: str
    paths: tuple[str, ...] = ()  # each row's file, relative to the source (groups are declared by it)


def class_files(source: Path) -> list[tuple[int, Path]]:
    """(class folder index, file) of every file decode_stream reads, in its order."""
    folders = list_class_folders(source)
    return [(i, p) for i, f in enumerate(folders) for p in sorted(f.rglob("*")) if p.is_file() and not p.name.startswith(".")]


def decode_stream(source: Path, sizes: tuple[int, ...], write, workers: int | None = None, progress=None) -> Streamed:
    """Validate and decode every file under source's class folders, handing each image to write() in order.

    write() gets one array per size in sizes (one decode each file: a train copy larger than val's).

    Broken files and classes left with no images are rejected; fewer than two classes is an
    error. Only the images being decoded are in memory (a bounded window of them), never the
    data set: write() stores each one (prepare appends it to a file).
    """
    folders = list_class_folders(source)
    files = class_files(source)
    rejected: list[Rejected] = []
    rows: list[int] = []  # the class folder of each image written
    written: list[str] = []
    md5s: dict[Path, str] = {}
    for (folder, path), (md5, result) in zip(files, decode_in_order([p for _, p in files], sizes, workers, progress), strict=True):
        md5s[path] = md5
        if isinstance(result, str):
            rejected.append(Rejected(str(path), result))
        else:
            write(result)
            rows.append(folder)
            written.append(path.relative_to(source).as_posix())
    counts = np.bincount(np.asarray(rows, dtype=np.int64), minlength=len(folders))
    for folder, n in zip(folders, counts, strict=True):
        if not n:
            rejected.append(Rejected(str(folder), "class folder has no usable images; class left out"))
    kept = [i for i, n in enumerate(counts) if n]
    classes = tuple(folders[i].name for i in kept)
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "none"
        raise TunedeckError(
            f"data.source '{source}' needs at least 2 classes with usable images (found {found}): "
            "add a sub-folder of images for each class."
        )
    label_of = {folder: label for label, folder in enumerate(kept)}
    labels = np.array([label_of[f] for f in rows], dtype=np.int64)
    return Streamed(classes, labels, tuple(rejected), folder_version(source, md5s), tuple(written))


def decode_folder(source: Path, size: int, workers: int | None = None, progress=None) -> Decoded:
    """decode_stream() into one in-memory array (for small folders and tests; prepare streams to disk)."""
    images: list[np.ndarray] = []
    streamed = decode_stream(source, (size,), lambda decoded: images.append(decoded[0]), workers, progress)
    return Decoded(streamed.classes, np.stack(images), streamed.labels, streamed.rejected, streamed.version)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a run pinned to some cores uses those)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def hash_and_decode(path: Path, sizes: tuple[int, ...]) -> tuple[str, list[np.ndarray] | str]:
    """path's md5 (for the data version, from the bytes read once) and its images, or why it cannot be decoded."""
    data = path.read_bytes()
    md5 = hashlib.md5(data).hexdigest()
    try:
        return md5, decode_bytes(data, sizes)
    except ValueError as exc:
        return md5, str(exc)


def decode_in_order(paths: list[Path], sizes: tuple[int, ...], workers: int | None = None, progress=None) -> Iterator:
    """hash_and_decode() of every path, yielded in order, in threads on every usable core, a bounded window at a time.

    Threads, not processes: Pillow's JPEG decoder, resize and hashlib let go of the GIL, and
    processes decoded no faster on 2 cores (bench/prepare_speed.py prints both side by side),
    while a pool of them costs a start. At most 4 files per thread are in flight at a time, so
    memory does not grow with the data.
    """
    workers = workers or min(32, usable_cores() + 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for i, path in enumerate(paths):
            pending.append(pool.submit(hash_and_decode, path, sizes))
            while pending and (len(pending) >= 4 * workers or i == len(paths) - 1):
                yield pending.popleft().result()
                if progress is not None:
                    progress(1)
