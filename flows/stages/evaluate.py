"""``python -m flows.stages.evaluate``: score the model on the test split."""

from __future__ import annotations

from flows.contracts import ModelCard, StageProgress, eval_scores
from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.core.params import Params
from flows.core.paths import EVAL, MODELS, PREPARED
from flows.stages.entry import finish, run_main


def work(params: Params, settings: Settings) -> dict:
    """Evaluate, and return the headline metrics with the data and model versions."""
    from flows.core.evaluate import evaluate
    from flows.stages.orchestration import report_progress

    metrics = evaluate(params, PREPARED, MODELS, EVAL)
    card = ModelCard.read(MODELS)
    # on the run's labels (its own, or the pipeline run's above it): the dashboard's TEST and F1 columns
    report_progress(StageProgress.scores("evaluate", eval_scores(metrics)), settings)
    return {
        "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "data_version": card.data_version,
        "model_sha256": card.sha256,
        **explained(),
    }


def explained() -> dict:
    """Where the Grad-CAM overlays are and the sanity check's figure; each attribute's worst group and gap."""
    import json

    overlays = sorted((EVAL / "explain").glob("*.png"))
    out = {"explanations": f"{EVAL / 'explain'}/ ({len(overlays)} Grad-CAM overlays, e.g. {overlays[0].name})"
           if overlays else "none"}
    try:
        sanity = json.loads((EVAL / "explain" / "sanity.json").read_text())
        out["gradcam_sanity_rho"] = sanity["spearman_trained_vs_random"]
        for attribute, head in json.loads((EVAL / "groups_metrics.json").read_text()).items():
            out[f"worst {attribute} group"] = f"{head['worst_accuracy']:.4f} (gap {head.get('gap', float('nan')):.4f})"
    except (OSError, ValueError, KeyError):
        pass
    return out


def tags() -> list[str]:
    """The data and model versions this run scores, as tags."""
    try:
        card = ModelCard.read(MODELS)
    except TunedeckError:
        return []
    return [f"data:{card.data_version[:12]}", f"model:{card.sha256[:12]}"]


if __name__ == "__main__":
    finish(run_main("evaluate", work, tags))
