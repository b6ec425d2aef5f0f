"""The prepare stage's work: validate the source, split it, store it decoded once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.contracts import PrepareManifest
from flows.core.errors import TunedeckError
from flows.core.images import decode_folder
from flows.core.params import Params, save_resolved
from flows.core.split import stratified_split


@dataclass(frozen=True)
class PrepareResult:
    """What prepare produced: class names, split sizes, the data version and rejected files."""

    classes: tuple[str, ...]
    counts: dict[str, int]
    data_version: str
    rejected: int


def prepare(params: Params, out: Path, progress=None) -> PrepareResult:
    """Decode params.data.source into out/{split}_x.npy (uint8 NHWC) and {split}_y.npy."""
    data = params.data
    decoded = decode_folder(Path(data.source), data.image_size, progress=progress)
    split = stratified_split(
        decoded.labels, data.val_fraction, data.test_fraction, params.base.seed, data.limit_per_class
    )
    if not len(split["test"]):
        raise TunedeckError(
            f"data.test_fraction {data.test_fraction} leaves no test image ({len(decoded.labels)} images in all): raise it."
        )
    out.mkdir(parents=True, exist_ok=True)
    for name, idx in split.items():
        np.save(out / f"{name}_x.npy", decoded.images[idx])
        np.save(out / f"{name}_y.npy", decoded.labels[idx])
    counts = {name: int(len(idx)) for name, idx in split.items()}
    PrepareManifest(
        source=data.source, data_version=decoded.version, classes=list(decoded.classes), image_size=data.image_size,
        counts=counts, per_class={
            name: {cls: int((decoded.labels[idx] == i).sum()) for i, cls in enumerate(decoded.classes)}
            for name, idx in split.items()
        },
    ).write(out)
    report = [{"path": r.path, "reason": r.reason} for r in decoded.rejected]
    (out / "rejected.json").write_text(json.dumps(report, indent=2))
    save_resolved(params, out)
    return PrepareResult(decoded.classes, counts, decoded.version, len(report))


def load_split(folder: Path, name: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One stored split: images (N, H, W, 3) uint8 and labels (N,)."""
    mode = "r" if mmap else None
    return np.load(folder / f"{name}_x.npy", mmap_mode=mode), np.load(folder / f"{name}_y.npy")


def load_manifest(folder: Path) -> PrepareManifest:
    """The manifest prepare wrote: classes, counts, image size and data version (one sentence if broken)."""
    return PrepareManifest.read(folder)
