"""Shipping as Prefect flows a deployment runs (prefect.yaml): predict on a worker's clone."""

from __future__ import annotations

from pathlib import Path

from prefect import flow


@flow(name="predict", log_prints=True)
def predict(input: str, out: str, model: str = "prod", backend: str = "torch") -> dict:
    """Label the images under input (a folder on the worker's host) into out (.parquet/.csv) with model:
    prod, a registry version vX.Y.Z or a .safetensors path; backend torch or onnx."""
    from flows.core.params import load_params
    from flows.predict_command import predict_command

    root = Path.cwd()
    return predict_command(root, load_params(root / "params.yaml"), model, Path(input), Path(out), backend)
