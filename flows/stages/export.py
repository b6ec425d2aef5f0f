"""``python -m flows.stages.export``: the model as ONNX, held to the torch model's outputs."""

from __future__ import annotations

import json
import logging
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
INT8 = EXPORT / "int8"
INT8_ONNX = INT8 / "model.onnx"


def work(params: Params, settings: Settings) -> dict:
    """Export models/model.safetensors to export/model.onnx, check it on validation images, write
    export/parity.json; return the parity headline."""
    from flows.core.export import check_parity, export_onnx, parity_images

    images = parity_images(PREPARED)  # before exporting: no images, nothing to vouch for the file
    export_onnx(MODEL_WEIGHTS, EXPORT_ONNX, params.export.opset)
    torch_out: dict = {}  # the torch side of the check, computed once for both runtimes
    try:
        report = check_parity(MODEL_WEIGHTS, EXPORT_ONNX, images, max_prob_diff=params.export.max_prob_diff,
                              torch_out=torch_out)
    except TunedeckError:
        # an export that failed its check is not left for predict to find, nor an older parity beside it
        EXPORT_ONNX.unlink(missing_ok=True)
        PARITY.unlink(missing_ok=True)
        raise
    report["max_prob_diff_allowed"] = params.export.max_prob_diff
    report["openvino"] = openvino_parity(images, params.export.max_prob_diff, torch_out)
    PARITY.write_text(json.dumps(report, indent=2))
    int8 = export_int8(params)
    return {
        "opset": report["opset"], "exporter": report["exporter"], "images": report["images"],
        "top1_agreement": report["top1_agreement"], "max_prob_diff": f"{report['max_prob_diff']:.1e}",
        "openvino": "parity" if "refused" not in report["openvino"] else "refused",
        "int8": "off" if not params.export.int8 else "accepted" if int8["accepted"] else "refused",
    }


def openvino_parity(images, max_prob_diff: float, torch_out: dict) -> dict:
    """The same parity check with OpenVINO running the export; a disagreement refuses that runtime (predict
    --backend openvino says so), not the export: the ONNX file is good for ONNX Runtime."""
    from flows.core.export import check_parity
    from flows.core.runtimes import OpenVinoClassifier

    try:
        run = OpenVinoClassifier(EXPORT_ONNX).logits
        found = check_parity(MODEL_WEIGHTS, EXPORT_ONNX, images, max_prob_diff=max_prob_diff, run=run, by="OpenVINO",
                             torch_out=torch_out)
    except TunedeckError as exc:
        logging.getLogger("tunedeck").warning("export: OpenVINO refused: %s", exc)
        return {"refused": str(exc)}
    return {"top1_agreement": found["top1_agreement"], "max_prob_diff": found["max_prob_diff"]}


def export_int8(params: Params) -> dict:
    """With export.int8, export/int8/model.onnx: the export quantised to int8 (calibrated on validation images),
    kept only when its test accuracy is at most export.int8_max_drop below the fp32 export's; export/int8/report.json
    says which, and why, either way."""
    import shutil

    from flows.core.export import OnnxClassifier
    from flows.core.prepare import load_split
    from flows.core.runtimes import INT8_CALIBRATION_IMAGES, accuracy, int8_verdict, quantize_int8

    shutil.rmtree(INT8, ignore_errors=True)
    INT8.mkdir(parents=True)
    report: dict = {"enabled": params.export.int8, "accepted": False}
    if params.export.int8:
        fp32 = OnnxClassifier(EXPORT_ONNX)
        calibration = normalised(load_split(PREPARED, "val")[0][:INT8_CALIBRATION_IMAGES], fp32.meta)
        test_x, test_y = load_split(PREPARED, "test")
        if not len(calibration) or not len(test_x):
            raise TunedeckError("export.int8 needs validation images to calibrate on and test images to measure the "
                                "accuracy cost on: give data.val_fraction and data.test_fraction above 0.")
        quantize_int8(EXPORT_ONNX, INT8_ONNX, calibration)
        test_x = normalised(test_x, fp32.meta)
        scores = accuracy(fp32.logits, test_x, test_y), accuracy(OnnxClassifier(INT8_ONNX).logits, test_x, test_y)
        accepted, why = int8_verdict(*scores, params.export.int8_max_drop)
        report.update(accepted=accepted, reason=why, fp32_accuracy=scores[0], int8_accuracy=scores[1],
                      max_drop=params.export.int8_max_drop, test_images=len(test_x))
        logging.getLogger("tunedeck").log(logging.INFO if accepted else logging.WARNING, "export: int8 model %s: %s",
                                          "kept" if accepted else "refused", why)
        if not accepted:
            INT8_ONNX.unlink()
    (INT8 / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def normalised(images, meta):
    """uint8 NHWC images as the model takes them: float32 NCHW, normalised."""
    import numpy as np

    from flows.core.predict import HostNormalizer

    norm = HostNormalizer(meta)
    return np.ascontiguousarray(np.stack([norm(i) for i in images]).transpose(0, 3, 1, 2)) if len(images) else \
        np.zeros((0, 3, meta.image_size, meta.image_size), np.float32)


def tags() -> list[str]:
    """The model version this run exports, as a tag."""
    try:
        card = ModelCard.read(MODELS)
    except TunedeckError:
        return []
    return [f"model:{card.sha256[:12]}"]


if __name__ == "__main__":
    finish(run_main("export", work, tags))
