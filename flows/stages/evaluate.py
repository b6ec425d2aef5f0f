"""``python -m flows.stages.evaluate``: score the model on the test split."""

from __future__ import annotations

import json
import sys

from flows.core.params import Params
from flows.core.paths import EVAL, MODEL_CONFIG, MODELS, PREPARED
from flows.stages.entry import run_main


def work(params: Params) -> dict:
    """Evaluate, and return the headline metrics with the data and model versions."""
    from flows.core.evaluate import evaluate

    metrics = evaluate(params, PREPARED, MODELS, EVAL)
    config = json.loads(MODEL_CONFIG.read_text())
    return {
        "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "data_version": config["data_version"],
        "model_sha256": config["sha256"],
    }


def tags() -> list[str]:
    """The data and model versions this run scores, as tags."""
    try:
        config = json.loads(MODEL_CONFIG.read_text())
        return [f"data:{config['data_version'][:12]}", f"model:{config['sha256'][:12]}"]
    except (OSError, KeyError, ValueError):
        return []


if __name__ == "__main__":
    sys.exit(run_main("evaluate", work, tags))
