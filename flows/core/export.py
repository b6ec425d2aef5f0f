"""The trained model as ONNX, the parity check that holds the export to the torch model, and an
onnxruntime classifier for ``tunedeck predict --backend onnx``.

The .onnx file describes itself as the .safetensors does: the same ModelMeta JSON sits in its
metadata_props under ``tunedeck.model``. Its input ``images`` is float32 NCHW, already normalised
((x/255 - mean)/std, as flows.core.augment.Normalizer does); its output ``logits`` is raw float32
logits (the temperature is applied by whoever turns them into probabilities). The batch
dimension is dynamic.

Two exporters, tried in order: TorchScript tracing (``dynamo=False``), then torch.export
(``dynamo=True``). On torch 2.14 tracing exports resnet18 in ~0.25 s against ~2.4 s, with the same
parity, and writes the opset asked for (torch.export writes 18 when asked for 13-17); each covers
timm models the other cannot (tracing lacks aten::rms_norm, torch.export fails to decompose
maxvit and vit_relpos). Which one wrote the file is logged and kept in its metadata.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from flows.contracts import ModelMeta
from flows.core.errors import TunedeckError
from flows.core.model_file import META_KEY, load_model

log = logging.getLogger("tunedeck")

EXPORTER_KEY = "tunedeck.exporter"
INPUT, OUTPUT = "images", "logits"
PARITY_IMAGES = 64  # enough to catch a wrong op; few enough that the check takes seconds at 224 px
REMEDY = "re-export it with `dvc repro export`"


def export_onnx(model_path: Path, out: Path, opset: int) -> Path:
    """Export the model file at model_path to out (atomically), with its ModelMeta in the metadata."""
    import onnx
    import torch

    model, meta = load_model(model_path, "cpu")
    # batch 2, not 1: both exporters may treat a dimension of size 1 as a constant
    sample = torch.rand(2, 3, meta.image_size, meta.image_size, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a folder beside out: an exporter may write external-data files next to the .onnx, and the
    # final rename stays on one filesystem
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        raw = Path(scratch) / "raw.onnx"
        exporter = _export(model, sample, raw, opset, f"{model_path} ({meta.model_name})")
        proto = onnx.load(str(raw))  # pulls any external data back in: one self-contained file
        _set_props(proto, {META_KEY: meta.model_dump_json(), EXPORTER_KEY: exporter})
        written = _opset_of(proto)
        if written != opset:
            log.warning("the %s exporter wrote ONNX opset %d, not export.opset %d", exporter, written, opset)
        tmp = Path(scratch) / "final.onnx"
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    return out


def _export(model, sample, path: Path, opset: int, what: str) -> str:
    """Export with the first exporter that succeeds; its name. One sentence when none does."""
    failures = []
    for name, exporter in EXPORTERS.items():
        try:
            with _quiet():
                exporter(model, sample, path, opset)
        except Exception as exc:  # the exporters raise many unrelated types; each is reported below
            failures.append(f"{name}: {_gist(exc)}")
            continue
        if failures:  # said out loud: the file came from the second choice
            log.warning("ONNX export of %s: %s; exported with %s instead", what, failures[0], name)
        return name
    raise TunedeckError(
        f"{what} could not be exported to ONNX opset {opset} ({'; '.join(failures)}): "
        "try another export.opset (13-23), or a model.name that torch.onnx can export."
    )


def _torchscript(model, sample, path: Path, opset: int) -> None:
    import torch

    torch.onnx.export(
        model, (sample,), str(path), input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
        dynamo=False, dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
    )


def _dynamo(model, sample, path: Path, opset: int) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model, (sample,), str(path), input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
        dynamo=True, dynamic_shapes=({0: batch},), verbose=False,
    )


EXPORTERS: dict[str, Callable] = {"torchscript": _torchscript, "dynamo": _dynamo}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence an exporter: its progress prints, deprecation warnings, and the C++ side's graph
    dump on failure (100 kB for a small ViT), which goes to file descriptor 2, not sys.stderr."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = []
    with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)


def _gist(exc: BaseException) -> str:
    """The line of an exception that says what went wrong (torch.export's messages are pages long)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1:]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _set_props(proto, props: dict[str, str]) -> None:
    """Set metadata_props entries, replacing any of the same key."""
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def _opset_of(proto) -> int:
    """The default-domain opset the model imports."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


# --- parity ---------------------------------------------------------------------------------


def parity_images(prepared: Path, limit: int = PARITY_IMAGES) -> np.ndarray:
    """Up to limit validation images (uint8 NHWC) of a prepared folder; test images when it has no
    validation split; one sentence when it has neither."""
    from flows.core.prepare import load_split

    for split in ("val", "test"):
        try:
            images, _ = load_split(Path(prepared), split)
        except FileNotFoundError:
            continue
        if len(images):
            return np.array(images[:limit])
    raise TunedeckError(f"{prepared} has no validation or test images to check the ONNX export on: run the prepare stage first (`dvc repro prepare`).")


def check_parity(model_path: Path, onnx_path: Path, images: np.ndarray, batch_sizes=(1, 7),
                 max_prob_diff: float = 1e-4, run: Callable[[np.ndarray], np.ndarray] | None = None,
                 by: str = "", torch_out: dict[int, np.ndarray] | None = None) -> dict:
    """Compare the ONNX export, run by onnxruntime (or by run: another runtime's logits of a batch, named by), with
    the torch model on the first PARITY_IMAGES images (uint8 NHWC), at each batch size. torch_out: the torch model's
    logits by batch size, filled here and reused by a second check of the same model and images.

    Both sides get the same normalised input; their softmax(logits / temperature) may differ by
    at most max_prob_diff, and their top-1 classes must agree (a flip between two classes whose
    torch probabilities are within 2 x max_prob_diff is a tie, not a disagreement).
    """
    import torch

    from flows.core.augment import Normalizer
    from flows.core.calibration import softmax

    model, meta = load_model(model_path, "cpu")
    images = np.asarray(images[:PARITY_IMAGES])
    if not len(images):
        raise TunedeckError(f"no images were given to check {onnx_path} on: run the prepare stage first (`dvc repro prepare`).")
    if images.shape[1:] != (meta.image_size, meta.image_size, 3):
        raise TunedeckError(
            f"the images to check {onnx_path} on are {'x'.join(map(str, images.shape[1:]))}, but {model_path} takes "
            f"{meta.image_size}x{meta.image_size}x3: prepare the data at the model's size (`dvc repro prepare train`)."
        )
    with torch.no_grad():
        x = Normalizer(meta.mean, meta.std, torch.device("cpu"))(torch.from_numpy(images)).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if run is None:
        session = open_session(onnx_path, ["CPUExecutionProvider"], spin=False)
        run = lambda b: _run(session, b, onnx_path)  # noqa: E731
    n, worst, flips = len(x), 0.0, np.zeros(len(x), dtype=bool)
    torch_out = {} if torch_out is None else torch_out
    for size in batch_sizes:
        if size not in torch_out:
            with torch.no_grad():
                torch_out[size] = _in_batches(lambda b: model(torch.from_numpy(b)).numpy(), x, size)
        ours = torch_out[size]
        theirs = _in_batches(run, x, size)
        if theirs.shape != ours.shape:
            raise TunedeckError(f"{onnx_path} gives {theirs.shape[1]} classes where {model_path} has {ours.shape[1]}: {REMEDY}.")
        p, q = softmax(ours, meta.temperature), softmax(theirs, meta.temperature)
        worst = max(worst, float(np.abs(p - q).max()))
        top_p, top_q = p.argmax(1), q.argmax(1)
        margin = p[np.arange(n), top_p] - p[np.arange(n), top_q]
        flips |= (top_p != top_q) & (margin > 2 * max_prob_diff)
    report = {
        "top1_agreement": 1.0 - float(flips.mean()), "max_prob_diff": worst, "images": n,
        "batch_sizes": list(batch_sizes), **_opset_and_exporter(onnx_path),
    }
    if flips.any() or worst > max_prob_diff:
        raise TunedeckError(
            f"the ONNX export {onnx_path}{f' run by {by}' if by else ''} disagrees with the torch model {model_path} (top-1 differs on {int(flips.sum())} "
            f"of the {n} images checked, max probability difference {worst:.2g} > {max_prob_diff:g}): try another "
            "export.opset (`dvc exp run -S export.opset=17`), or raise export.max_prob_diff if the difference is acceptable."
        )
    return report


def _in_batches(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, size: int) -> np.ndarray:
    """run over x, size rows at a time (the last batch may be smaller), concatenated."""
    return np.concatenate([run(x[i:i + size]) for i in range(0, len(x), size)])


def _run(session, x: np.ndarray, onnx_path: Path) -> np.ndarray:
    """The session's logits for one batch; one sentence when onnxruntime refuses it."""
    try:
        return session.run([OUTPUT], {INPUT: x})[0]
    except Exception as exc:  # onnxruntime's own error types (a batch dimension that is not dynamic, a wrong input)
        raise TunedeckError(f"onnxruntime cannot run {onnx_path} on a batch of {len(x)} ({_gist(exc)}): {REMEDY}.") from None


# --- running an export ----------------------------------------------------------------------


def open_session(onnx_path: Path, providers: list[str], threads: int | None = None, spin: bool = True):
    """An onnxruntime InferenceSession; one sentence when the file is missing or not an ONNX model.

    spin=False stops its idle threads busy-waiting between runs, for when torch runs in between.
    """
    import onnxruntime as ort

    path = Path(onnx_path)
    if not path.is_file():
        raise TunedeckError(f"ONNX model {path} not found: export the model first (`dvc repro export`).")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a missing CUDA library is not news on a CPU host
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, ... for a damaged file
        raise TunedeckError(f"{path} is not a readable ONNX model ({_gist(exc)}): {REMEDY}.") from None


def onnx_props(session) -> dict[str, str]:
    """The model's metadata_props, as onnxruntime reads them."""
    return dict(session.get_modelmeta().custom_metadata_map)


def read_onnx_meta(session, onnx_path: Path) -> ModelMeta:
    """The ModelMeta in an export's metadata_props; one sentence when it is missing or damaged."""
    return _parse_meta(onnx_props(session).get(META_KEY), onnx_path)


def onnx_meta(onnx_path: Path) -> ModelMeta:
    """The ModelMeta in an export's metadata_props, read from the file (for a runtime other than onnxruntime)."""
    if not Path(onnx_path).is_file():
        raise TunedeckError(f"ONNX model {onnx_path} not found: export the model first (`dvc repro export`).")
    try:
        props = _file_props(onnx_path)
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others for a damaged file
        raise TunedeckError(f"{onnx_path} is not a readable ONNX model ({_gist(exc)}): {REMEDY}.") from None
    return _parse_meta(props.get(META_KEY), onnx_path)


def _file_props(onnx_path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}


def _parse_meta(raw: str | None, onnx_path: Path) -> ModelMeta:
    if raw is None:
        raise TunedeckError(f"{onnx_path} has no tunedeck metadata: it was not written by the export stage; {REMEDY}.")
    try:
        return ModelMeta.model_validate_json(raw)
    except ValueError:  # pydantic's ValidationError is a ValueError
        raise TunedeckError(f"{onnx_path} has damaged tunedeck metadata: {REMEDY}.") from None


def _opset_and_exporter(onnx_path: Path) -> dict:
    """The file's opset and exporter, from one read of it (a large model's file is read once, not twice)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return {"opset": _opset_of(proto), "exporter": props.get(EXPORTER_KEY, "unknown")}


def onnx_opset(onnx_path: Path) -> int:
    """The default-domain opset of an ONNX file."""
    import onnx

    return _opset_of(onnx.load(str(onnx_path), load_external_data=False))


class OnnxClassifier:
    """A model exported by export_onnx, run by onnxruntime: on CUDA where onnxruntime has it, else CPU."""

    def __init__(self, onnx_path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = open_session(onnx_path, providers, threads)
        """The onnxruntime session."""
        self.meta: ModelMeta = read_onnx_meta(self.session, onnx_path)
        """Classes, input size, normalisation and temperature, as the .safetensors file has them."""

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 logits (N x classes) of a float32 normalised NCHW batch of any size."""
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
