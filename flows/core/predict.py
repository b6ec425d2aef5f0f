"""Batch prediction: a folder of images through one model file, to a table of labels and top-k.

Images are decoded by prepare's own decode_image (same resize, same crop), so a model sees
exactly what it was trained and evaluated on. Decoding runs in a bounded window of threads
while the model runs on the previous batch: memory stays flat and the model rarely waits.
A file that will not decode is listed as a failure with its reason, never the end of the run.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from flows.contracts import ModelMeta
from flows.core.atomic import replace_atomically
from flows.core.calibration import softmax
from flows.core.errors import TunedeckError
from flows.core.images import decode_image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Row:
    """One image's prediction: best label first, then the top-k labels and probabilities."""

    path: str
    label: str
    confidence: float
    topk_labels: tuple[str, ...]
    topk_probs: tuple[float, ...]


@dataclass(frozen=True)
class Failure:
    """An image that could not be decoded, and why (one sentence)."""

    path: str
    reason: str


@dataclass(frozen=True)
class Predictions:
    """Every row and failure of one run, in input order, and the model that made them."""

    rows: list[Row]
    failures: list[Failure]
    model_version: str
    model_sha256: str
    priors: dict[str, float] | None = None  # the images' class mix by EM (predict --prior-shift), else None


class Backend(Protocol):
    """What predict() needs of a model: its meta, its file's hash, and logits of a batch."""

    meta: ModelMeta
    sha256: str

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One decoded uint8 HWC image as the model takes it; runs in a decode thread."""

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 logits (N × classes) of a stack of prepare()'s outputs."""


class HostNormalizer:
    """augment.Normalizer's arithmetic, (x - mean·255) / (std·255) in float32, on one HWC image with numpy.

    The floats are the same, bit for bit. Run in the decode threads while the model runs, it
    costs a third of torch's pass over the whole batch on the main thread (the image is still
    in cache), which on a CPU is time taken from the model.
    """

    def __init__(self, meta: ModelMeta) -> None:
        shape = (meta.image_size, meta.image_size, 3)  # tiled: numpy broadcasting over an axis of 3 is twice as slow
        self.mean = np.broadcast_to(np.asarray(meta.mean, dtype=np.float32) * np.float32(255), shape).copy()
        self.std = np.broadcast_to(np.asarray(meta.std, dtype=np.float32) * np.float32(255), shape).copy()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out = np.subtract(image, self.mean, dtype=np.float32)
        return np.divide(out, self.std, out=out)


def list_images(folder: Path) -> list[Path]:
    """The image files under folder (recursively, hidden ones skipped), sorted; one sentence when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise TunedeckError(f"image folder '{folder}' {what}: give the folder of images to predict on.")
    found = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
         and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not found:
        kinds = ", ".join(sorted(IMAGE_SUFFIXES))
        raise TunedeckError(f"image folder '{folder}' has no image files ({kinds}): put the images to predict on in it.")
    return found


def predict(images: list[Path], backend: Backend, batch_size: int = 64, top_k: int = 3, workers: int = 0,
            progress=None, root: Path | None = None, model_version: str = "file",
            source_priors: np.ndarray | None = None) -> Predictions:
    """Predict every image, in order, decoding in `workers` threads (0: one per core) while the model runs.

    Row paths are relative to root when given. progress(done, total), when given, is called
    after every batch and at the end. With source_priors (the class mix the model was trained on), the
    rows are corrected for the images' own class mix, estimated by EM over them all (estimate.em_priors),
    and Predictions.priors holds it.
    """
    if batch_size < 1 or top_k < 1 or workers < 0:
        raise TunedeckError(
            f"predict needs batch_size >= 1, top_k >= 1 and workers >= 0 (got {batch_size}, {top_k}, {workers}): fix them in params.yaml.")
    meta = backend.meta
    top_k = min(top_k, len(meta.classes))
    name = (lambda p: Path(p).relative_to(root).as_posix()) if root is not None else str
    rows: list[Row] = []
    failures: list[Failure] = []
    batch: list[np.ndarray] = []
    names: list[str] = []
    held: list[tuple[list[str], np.ndarray]] = []  # with source_priors: every batch's logits, corrected at the end
    decoded = decode_ahead(images, backend.prepare, meta.image_size, workers or os.cpu_count() or 1, batch_size)
    with contextlib.closing(decoded):  # on an error, stop the decode threads now, not when the traceback goes
        for done, (path, item) in enumerate(decoded, 1):
            if isinstance(item, str):
                failures.append(Failure(name(path), item))
            else:
                batch.append(item)
                names.append(name(path))
            ran = bool(batch) and (len(batch) == batch_size or done == len(images))
            if ran:
                if source_priors is None:
                    rows.extend(_rows(names, backend.logits(np.stack(batch)), meta, top_k))
                else:
                    held.append((list(names), backend.logits(np.stack(batch))))
                batch.clear()
                names.clear()
            if progress is not None and (ran or done == len(images)):
                progress(done, len(images))
    if source_priors is None:
        return Predictions(rows, failures, model_version, backend.sha256)
    from flows.core.estimate import em_priors

    every = [n for names_, _ in held for n in names_]
    logits = np.concatenate([lg for _, lg in held]) if held else np.zeros((0, len(meta.classes)))
    priors, corrected = em_priors(softmax(logits, meta.temperature), source_priors)
    return Predictions(_rows_of(every, corrected, meta, top_k), failures, model_version, backend.sha256,
                       priors={c: float(p) for c, p in zip(meta.classes, priors, strict=True)})


def decode_ahead(images: list[Path], prepare, size: int, workers: int, batch_size: int) -> Iterator[tuple[Path, np.ndarray | str]]:
    """(path, prepared image or why it failed) for every image, in order, decoded in threads ahead of the model.

    The window holds the next batch and a few images per thread: the model never waits while a
    batch decodes, and memory does not grow with the number of images.
    """
    def work(path: Path) -> np.ndarray | str:
        try:
            image = decode_image(path, size)  # the prepare stage's own decoding: what the model was trained on
        except ValueError as exc:
            return str(exc)
        except OSError as exc:  # unreadable: permissions, gone since it was listed
            return f"cannot read the file ({exc.strerror or exc})"
        except Exception as exc:  # Pillow fails in more ways than decode_image names; one file never ends the run
            return f"cannot decode it ({type(exc).__name__}: {exc})"
        return prepare(image)

    window = batch_size + 4 * workers
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tunedeck-decode")
    pending: deque = deque()
    try:
        for path in images:
            pending.append((path, pool.submit(work, path)))
            if len(pending) >= window:
                head, future = pending.popleft()
                yield head, future.result()
        while pending:
            head, future = pending.popleft()
            yield head, future.result()
    finally:  # stopped early (an error, Ctrl-C): drop what is queued, wait only for what is running
        pool.shutdown(wait=True, cancel_futures=True)


def _rows(paths: list[str], logits: np.ndarray, meta: ModelMeta, top_k: int) -> list[Row]:
    """Rows from one batch's logits: softmax(logits / temperature), best first."""
    return _rows_of(paths, softmax(logits, meta.temperature), meta, top_k)


def _rows_of(paths: list[str], probs: np.ndarray, meta: ModelMeta, top_k: int) -> list[Row]:
    """Rows from class probabilities, best first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]  # stable: ties go to the lower index, as argmax
    rows = []
    for path, p, best in zip(paths, probs, order, strict=True):
        labels = tuple(meta.classes[i] for i in best)
        rows.append(Row(path, labels[0], float(p[best[0]]), labels, tuple(float(p[i]) for i in best)))
    return rows


class TorchBackend:
    """A model file run by torch: no autograd, channels_last for CNNs, bf16 autocast on CUDA GPUs that have it.

    On the CPU it stays fp32, so its top-1 matches the ONNX export's.
    """

    def __init__(self, model_path: Path, device="cpu") -> None:
        import torch

        from flows.core.augment import Normalizer
        from flows.core.devices import resolve_device
        from flows.core.model_file import load_model, sha256
        from flows.core.speed import uses_convolutions

        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model, self.meta = load_model(Path(model_path), self.device)
        self.channels_last = uses_convolutions(self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        self.host_norm = HostNormalizer(self.meta) if self.device.type == "cpu" else None
        self.norm = Normalizer(self.meta.mean, self.meta.std, self.device)
        self.sha256 = sha256(Path(model_path))

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """On the CPU normalised here, in the decode thread; for a GPU left uint8 (a quarter of the bytes to copy)."""
        return self.host_norm(image) if self.host_norm is not None else image

    def tensor(self, batch: np.ndarray):
        """A stack of prepare()'s outputs as the model's input on the device (NCHW, channels_last for CNNs)."""
        import torch

        x = torch.from_numpy(batch).to(self.device)
        x = self.norm(x) if batch.dtype == np.uint8 else x.permute(0, 3, 1, 2)  # NHWC memory is channels_last NCHW
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, x) -> np.ndarray:
        """The model's float32 logits of an input tensor()."""
        import torch

        from flows.core.speed import autocast

        with torch.inference_mode(), autocast(self.device, self.dtype):
            return self.model(x).float().cpu().numpy()

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.forward(self.tensor(batch))


class OnnxBackend:
    """An exported .onnx model run by ONNX Runtime (flows.core.export.OnnxClassifier) or, with runtime="openvino",
    by OpenVINO (flows.core.runtimes.OpenVinoClassifier); torch is not needed."""

    def __init__(self, onnx_path: Path, threads: int | None = None, runtime: str = "onnxruntime") -> None:
        from flows.core.export import OnnxClassifier
        from flows.core.model_file import sha256
        from flows.core.runtimes import OpenVinoClassifier

        kind = OpenVinoClassifier if runtime == "openvino" else OnnxClassifier
        self.classifier = kind(Path(onnx_path), threads)
        self.meta = self.classifier.meta
        self.prepare = HostNormalizer(self.meta)
        self.sha256 = sha256(Path(onnx_path))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))  # NHWC to the NCHW the export takes
        return np.asarray(self.classifier.logits(x), dtype=np.float32)


def write_predictions(pred: Predictions, out: Path) -> None:
    """Write rows to out (.parquet or .csv) and failures to <stem>.errors.csv beside it, each atomically."""
    out = Path(out)
    writers = {".parquet": _write_parquet, ".csv": _write_csv}
    if out.suffix.lower() not in writers:
        raise TunedeckError(f"output '{out}' is neither .parquet nor .csv: name the output file with one of those suffixes.")
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(out, lambda tmp: writers[out.suffix.lower()](pred, tmp))
    errors = out.with_name(f"{out.stem}.errors.csv")
    if pred.failures:
        replace_atomically(errors, lambda tmp: _write_csv_rows(tmp, ["path", "reason"], ([f.path, f.reason] for f in pred.failures)))
    else:
        errors.unlink(missing_ok=True)  # one left by an earlier run would blame files this run read fine


def _write_parquet(pred: Predictions, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(pred.rows)
    table = pa.table({
        "path": pa.array([r.path for r in pred.rows], pa.string()),
        "label": pa.array([r.label for r in pred.rows], pa.string()),
        "confidence": pa.array([r.confidence for r in pred.rows], pa.float32()),
        "topk_labels": pa.array([list(r.topk_labels) for r in pred.rows], pa.list_(pa.string())),
        "topk_probs": pa.array([list(r.topk_probs) for r in pred.rows], pa.list_(pa.float32())),
        "model_version": pa.array([pred.model_version] * n, pa.string()),
        "model_sha256": pa.array([pred.model_sha256] * n, pa.string()),
    })
    pq.write_table(table, path)


def _write_csv(pred: Predictions, path: Path) -> None:
    header = ["path", "label", "confidence", "topk", "model_version", "model_sha256"]
    _write_csv_rows(path, header, (
        [r.path, r.label, f"{r.confidence:.6f}", ";".join(f"{lab}:{p:.4f}" for lab, p in zip(r.topk_labels, r.topk_probs, strict=True)),
         pred.model_version, pred.model_sha256] for r in pred.rows))


def _write_csv_rows(path: Path, header: list[str], rows) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
