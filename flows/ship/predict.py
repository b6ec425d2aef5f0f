"""`tunedeck predict` and the `predict` deployment: a folder of images labelled by prod, a registry
version or a model file, with torch, or the exported ONNX model run by ONNX Runtime or OpenVINO (or its int8 model); one row per image."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from flows.core.errors import TunedeckError
from flows.core.params import Params
from flows.ship.gate import MODEL_CACHE, resolve_model

BACKENDS = ("torch", "onnx", "openvino", "onnx-int8", "openvino-int8")
"""torch runs the model file; the others the export stage's ONNX file (with -int8: its int8 model)."""


def onnx_for(root: Path, model_path: Path, version: str, opset: int) -> Path:
    """The ONNX model of a model file: the export stage's (of this workspace, or of the registry version's
    commit), else one exported now into .tunedeck/models/ (the export stage's code, once per model)."""
    from flows.contracts import ModelCard
    from flows.core.export import export_onnx
    from flows.core.model_file import sha256
    from flows.gateways.dvc.cli import dvc

    digest = sha256(model_path)
    cached = root / MODEL_CACHE / f"{digest[:16]}.onnx"
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        if ModelCard.read(root / "models").sha256 == digest and (root / "export" / "model.onnx").is_file():
            return root / "export" / "model.onnx"
    except TunedeckError:
        pass
    if version != "file":
        try:
            dvc("get", ".", "export/model.onnx", "--rev", f"model@{version}", "-o", str(cached), "--force", cwd=root)
            return cached
        except TunedeckError:
            pass  # that version's commit has no export output: export it here
    print(f"predict: exporting {model_path} to ONNX for this prediction ({cached})", file=sys.stderr)
    return export_onnx(model_path, cached, opset)


def int8_for(root: Path, model_path: Path, version: str) -> Path:
    """The int8 model the export stage kept for a model file (of this workspace, or of the registry version's
    commit); one sentence saying why there is none (export.int8 off, or the model refused for its accuracy cost)."""
    import json

    from flows.contracts import ModelCard
    from flows.core.model_file import sha256
    from flows.gateways.dvc.cli import dvc

    digest = sha256(model_path)
    cached = root / MODEL_CACHE / f"{digest[:16]}.int8.onnx"
    local = root / "export" / "int8"
    try:
        ours = ModelCard.read(root / "models").sha256 == digest
    except TunedeckError:
        ours = False
    if ours and (local / "model.onnx").is_file():
        return local / "model.onnx"
    if ours and (local / "report.json").is_file():
        reason = json.loads((local / "report.json").read_text()).get("reason")
        why = f"the export stage refused it: {reason}" if reason else "export.int8 is off"
        raise TunedeckError(f"{model_path} has no int8 model ({why}): set export.int8: true (or raise "
                            "export.int8_max_drop) and run the export stage, or use --backend onnx.")
    if cached.is_file():
        return cached
    if version != "file":
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            dvc("get", ".", "export/int8/model.onnx", "--rev", f"model@{version}", "-o", str(cached), "--force", cwd=root)
            return cached
        except TunedeckError:
            pass
    raise TunedeckError(f"{model_path} ({version}) has no int8 model from the export stage: run it with "
                        "export.int8: true (`dvc exp run -S export.int8=true`), or use --backend onnx.")


def training_priors(root: Path, model_path: Path, version: str) -> np.ndarray:
    """The class mix a model was trained on, read from its held-out reference (a stratified split: the same mix)."""
    from flows.core.drift import Reference
    from flows.ship.monitor import reference_for

    try:
        reference = Reference.load(reference_for(root, model_path, version))
    except TunedeckError:
        if version != "file":
            raise
        raise TunedeckError(f"{model_path} comes with no held-out reference, so the class mix it was trained on is "
                            "unknown: use --prior-shift with the prod model or a registry version.") from None
    if reference.labels is None or not len(reference.labels):
        raise TunedeckError(f"model {version}'s reference keeps no held-out labels, so its training class mix is unknown: "
                            "retrain it with this version of tunedeck (`dvc repro`) to use --prior-shift.")
    return np.bincount(np.asarray(reference.labels), minlength=len(reference.classes)) / len(reference.labels)


def predict_command(root: Path, params: Params, model: str, input_dir: Path, out: Path, backend: str = "torch",
                    device: str | None = None, prior_shift: bool = False) -> dict:
    """Label every image under input_dir; rows to out (.parquet/.csv), unreadable files to <out>.errors.csv.
    prior_shift: correct the rows for the images' own class mix (EM), printed."""
    from tqdm import tqdm

    from flows.core.predict import OnnxBackend, TorchBackend, list_images, predict, write_predictions

    if Path(out).suffix.lower() not in (".parquet", ".csv"):
        raise TunedeckError(f"--out {out}: name the output FILE.parquet or FILE.csv.")
    images = list_images(Path(input_dir))
    model_path, version = resolve_model(model, root)
    source = training_priors(root, model_path, version) if prior_shift else None
    if backend not in BACKENDS:
        raise TunedeckError(f"--backend {backend}: give one of {', '.join(BACKENDS)}.")
    if backend != "torch":
        from flows.core.model_file import sha256

        runtime, _, int8 = backend.partition("-")
        path = int8_for(root, model_path, version) if int8 else onnx_for(root, model_path, version, params.export.opset)
        runner = OnnxBackend(path, runtime="openvino" if runtime == "openvino" else "onnxruntime")
        runner.sha256 = sha256(model_path)  # rows name the model file (the registry's), whichever backend ran it
    else:
        runner = TorchBackend(model_path, device or params.base.device)
    bar = tqdm(total=len(images), unit="img", desc="predict", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    tic = time.perf_counter()
    try:
        result = predict(images, runner, params.predict.batch_size, params.predict.top_k, params.predict.workers,
                         progress=progress, root=Path(input_dir), model_version=version, source_priors=source)
    finally:
        bar.close()
    seconds = time.perf_counter() - tic
    write_predictions(result, Path(out))
    if result.failures:
        errors = Path(out).with_name(f"{Path(out).stem}.errors.csv")
        print(f"predict: {len(result.failures)} of {len(images)} files could not be read (listed in {errors}); "
              f"the first: {result.failures[0].path}: {result.failures[0].reason}", file=sys.stderr)
    print(f"predict: {len(result.rows)} images labelled by {version} ({backend}) in {seconds:.1f} s -> {out}")
    if result.priors is not None:
        mix = ", ".join(f"{c} {p:.1%} (trained on {q:.1%})" for (c, p), q in zip(result.priors.items(), source, strict=True))
        print(f"predict: corrected for the images' class mix, estimated by EM: {mix}")
    return {"images": len(images), "rows": len(result.rows), "failures": len(result.failures), "model_version": version,
            "model_sha256": result.model_sha256[:12], "backend": backend, "out": str(out),
            "images_per_s": round(len(result.rows) / max(seconds, 1e-9), 1),
            **({"priors": {c: round(p, 4) for c, p in result.priors.items()}} if result.priors is not None else {})}
