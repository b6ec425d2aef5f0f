"""``python -m flows.stages.train``: fine-tune the backbone, log with dvclive, write the model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flows.core.params import Params
from flows.core.paths import MODELS, PREPARED, TRAIN_LIVE, WEIGHTS
from flows.stages.entry import run_main


def work(params: Params) -> dict:
    """Train with dvclive logging every epoch's metrics (plots under dvclive/plots)."""
    from dvclive import Live
    from flows.core.train import train

    warn_if_untracked_weights(params)
    with Live(dir=str(TRAIN_LIVE), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        live.log_params({"model": params.model.name, "pretrained": str(params.model.pretrained)})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            for key, value in metrics.items():
                live.log_metric(key, value)
            live.next_step()

        result = train(params, PREPARED, MODELS, on_epoch)
    return {
        "model_sha256": result.model_sha256,
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "weights_from": result.weights_from,
        "seconds": round(result.seconds, 1),
    }


def warn_if_untracked_weights(params: Params) -> None:
    """A weights file outside weights/ is not a DVC dependency: say so, once."""
    spec = params.model.pretrained
    if isinstance(spec, str) and not Path(spec).resolve().is_relative_to(WEIGHTS.resolve()):
        logging.getLogger("tunedeck").warning(
            "train: model.pretrained '%s' lies outside %s/, so DVC cannot see when it changes; move it there.", spec, WEIGHTS
        )


def tags() -> list[str]:
    """The data version this run trains on, as a tag."""
    from flows.core.prepare import load_manifest

    try:
        return [f"data:{load_manifest(PREPARED)['data_version'][:12]}"]
    except (OSError, KeyError, ValueError):
        return []


if __name__ == "__main__":
    sys.exit(run_main("train", work, tags))
