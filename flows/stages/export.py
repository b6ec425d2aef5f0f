"""``python -m flows.stages.export``: the model as ONNX, held to the torch model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

from flows.contracts import ModelCard
from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.core.params import Params
from flows.core.paths import MODEL_WEIGHTS, MODELS, PREPARED
from flows.stages.entry import finish, run_main

EXPORT = Path("export")
EXPORT_ONNX = EXPORT / "model.onnx"
PARITY = EXPORT / "parity.json"


def work(params: Params, settings: Settings) -> dict:
    """Export models/model.safetensors to export/model.onnx, check it on validation images, write
    export/parity.json; return the parity headline."""
    from flows.core.export import check_parity, export_onnx, parity_images

    images = parity_images(PREPARED)  # before exporting: no images, nothing to vouch for the file
    export_onnx(MODEL_WEIGHTS, EXPORT_ONNX, params.export.opset)
    try:
        report = check_parity(MODEL_WEIGHTS, EXPORT_ONNX, images, max_prob_diff=params.export.max_prob_diff)
    except TunedeckError:
        # an export that failed its check is not left for predict to find, nor an older parity beside it
        EXPORT_ONNX.unlink(missing_ok=True)
        PARITY.unlink(missing_ok=True)
        raise
    report["max_prob_diff_allowed"] = params.export.max_prob_diff
    PARITY.write_text(json.dumps(report, indent=2))
    return {
        "opset": report["opset"], "exporter": report["exporter"], "images": report["images"],
        "top1_agreement": report["top1_agreement"], "max_prob_diff": f"{report['max_prob_diff']:.1e}",
    }


def tags() -> list[str]:
    """The model version this run exports, as a tag."""
    try:
        card = ModelCard.read(MODELS)
    except TunedeckError:
        return []
    return [f"model:{card.sha256[:12]}"]


if __name__ == "__main__":
    finish(run_main("export", work, tags))
