"""`tunedeck predict` and the `predict` deployment: a folder of images labelled by prod, a registry
version or a model file, with torch or the exported ONNX model; one row per image."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from flows.core.errors import TunedeckError
from flows.core.params import Params
from flows.ship.gate import MODEL_CACHE, resolve_model


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


def predict_command(root: Path, params: Params, model: str, input_dir: Path, out: Path, backend: str = "torch",
                    device: str | None = None) -> dict:
    """Label every image under input_dir; rows to out (.parquet/.csv), unreadable files to <out>.errors.csv."""
    from tqdm import tqdm

    from flows.core.predict import OnnxBackend, TorchBackend, list_images, predict, write_predictions

    if Path(out).suffix.lower() not in (".parquet", ".csv"):
        raise TunedeckError(f"--out {out}: name the output FILE.parquet or FILE.csv.")
    images = list_images(Path(input_dir))
    model_path, version = resolve_model(model, root)
    if backend == "onnx":
        from flows.core.model_file import sha256

        runner = OnnxBackend(onnx_for(root, model_path, version, params.export.opset))
        runner.sha256 = sha256(model_path)  # rows name the model file (the registry's), whichever backend ran it
    else:
        runner = TorchBackend(model_path, device or params.base.device)
    bar = tqdm(total=len(images), unit="img", desc="predict", file=sys.stderr, disable=None)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    tic = time.perf_counter()
    try:
        result = predict(images, runner, params.predict.batch_size, params.predict.top_k, params.predict.workers,
                         progress=progress, root=Path(input_dir), model_version=version)
    finally:
        bar.close()
    seconds = time.perf_counter() - tic
    write_predictions(result, Path(out))
    if result.failures:
        errors = Path(out).with_name(f"{Path(out).stem}.errors.csv")
        print(f"predict: {len(result.failures)} of {len(images)} files could not be read (listed in {errors}); "
              f"the first: {result.failures[0].path}: {result.failures[0].reason}", file=sys.stderr)
    print(f"predict: {len(result.rows)} images labelled by {version} ({backend}) in {seconds:.1f} s -> {out}")
    return {"images": len(images), "rows": len(result.rows), "failures": len(result.failures), "model_version": version,
            "model_sha256": result.model_sha256[:12], "backend": backend, "out": str(out),
            "images_per_s": round(len(result.rows) / max(seconds, 1e-9), 1)}
