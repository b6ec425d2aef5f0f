"""Shipping as Prefect flows a deployment runs (prefect.yaml): predict on a worker's clone."""

from __future__ import annotations

from pathlib import Path

from prefect import flow


@flow(name="predict", log_prints=True)
def predict(input: str, out: str, model: str = "prod", backend: str = "torch", prior_shift: bool = False) -> dict:
    """Label the images under input (a folder on the worker's host) into out (.parquet/.csv) with model:
    prod, a registry version vX.Y.Z or a .safetensors path; backend torch, onnx, openvino, onnx-int8 or openvino-int8; prior_shift: corrected
    for the images' own class mix (EM)."""
    from flows.core.params import load_params
    from flows.ship.predict import predict_command

    root = Path.cwd()
    return predict_command(root, load_params(root / "params.yaml"), model, Path(input), Path(out), backend,
                           prior_shift=prior_shift)


@flow(name="monitor", log_prints=True)
def monitor(folder: str = "data/incoming", batches: bool = True) -> list[dict]:
    """Drift of new images against the prod model's reference. batches: each sub-folder of folder not
    monitored before is one batch (in name order: drop a folder per day, say); else folder is one batch."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.settings import PREFECT_API_URL

    from flows.core.params import load_params
    from flows.ship.monitor import monitor_batch as score
    from flows.ship.monitor import read_history, summary

    root = Path.cwd()
    params = load_params(root / "params.yaml")
    base = Path(folder) if Path(folder).is_absolute() else root / folder
    if batches:
        seen = {b.folder for b in read_history(root)}
        todo = [p for p in sorted(base.iterdir()) if p.is_dir() and str(p) not in seen] if base.is_dir() else []
    else:
        todo = [base]
    done = []
    for batch_folder in todo:
        batch = score(root, params, batch_folder, api_url=PREFECT_API_URL.value())
        print(f"monitor {batch_folder.name}: {summary(batch)}")
        rows = "\n".join(f"| {s.name} | {s.value:.4g} | {s.direction} {s.threshold:g} | {'DRIFT' if s.flagged else ''} |"
                         for s in batch.statistics)
        create_markdown_artifact(key="drift", description=summary(batch),
                                 markdown=f"**{summary(batch)}**\n\n| statistic | value | threshold | |\n|---|---|---|---|\n{rows}\n")
        done.append(batch.model_dump(mode="json"))
    if not todo:
        print(f"monitor: no new batch under {base}")
    return done
