"""Where an exported model runs besides torch: OpenVINO (any x86 CPU, Intel GPUs and NPUs), and an int8 model
quantised after training (ONNX Runtime's static quantisation, calibrated on training images), with what it costs in
test accuracy.

OpenVINO reads the export stage's ONNX file itself. Its CPU plugin would run in bf16 on CPUs that have it (its
default precision hint there): held to f32 here, so its top-1 matches torch's, as the export's parity check demands.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from flows.contracts import ModelMeta
from flows.core.errors import TunedeckError

INT8_CALIBRATION_IMAGES = 256


def compile_openvino(onnx_path: Path, threads: int | None = None, device: str = "CPU"):
    """An ONNX file compiled by OpenVINO for device, in f32; one sentence when OpenVINO is missing or refuses it."""
    try:
        import openvino as ov
    except ImportError:
        raise TunedeckError("OpenVINO is not installed here: `pip install openvino` (it is among tunedeck's "
                            "dependencies), or use --backend onnx.") from None
    if not Path(onnx_path).is_file():
        raise TunedeckError(f"ONNX model {onnx_path} not found: export the model first (`dvc repro export`).")
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        core = ov.Core()
        return core.compile_model(core.read_model(str(onnx_path)), device, config)
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses with long C++ messages
        raise TunedeckError(f"OpenVINO cannot run {onnx_path} on {device} ({_gist(exc)}): run the export stage again "
                            "(`dvc repro export`), or use --backend onnx.") from None


def _gist(exc: BaseException) -> str:
    """The line of an OpenVINO error that says what is wrong: its first lines name C++ files, checks and headings
    (ending in a colon), and their wording changes between releases (2025.4 and 2026.4 both read here)."""
    frames = ("Exception from", "Check ", "FrontEnd API failed", "Errors during", "While validating", "--", "Summary")
    lines = [line.strip() for line in str(exc).splitlines()
             if line.strip() and not line.strip().startswith(frames) and not line.strip().endswith(":")]
    return (lines[0] if lines else type(exc).__name__)[:200].rstrip(".")


class OpenVinoClassifier:
    """A model exported by the export stage, run by OpenVINO on the CPU."""

    def __init__(self, onnx_path: Path, threads: int | None = None) -> None:
        from flows.core.export import onnx_meta

        self.meta: ModelMeta = onnx_meta(Path(onnx_path))
        self.compiled = compile_openvino(Path(onnx_path), threads)
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """float32 logits (N x classes) of a float32 normalised NCHW batch of any size."""
        result = self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.array(result[self.output], dtype=np.float32)


def quantize_int8(onnx_path: Path, out: Path, calibration: np.ndarray) -> Path:
    """onnx_path quantised to int8 at out (QDQ, weights per channel, activations' ranges from calibration: float32
    normalised NCHW images, the model's own training images), its metadata kept."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from flows.core.export import INPUT

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: np.ascontiguousarray(batch, dtype=np.float32)}

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    source, quantized = onnx.load(str(onnx_path), load_external_data=False), onnx.load(str(out))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(source.metadata_props)  # the classes, size and normalisation, as the export has
    onnx.save(quantized, str(out))
    return out


def accuracy(logits: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, batch: int = 64) -> float:
    """Top-1 accuracy of a runtime's logits on normalised NCHW images x with labels y."""
    predicted = np.concatenate([logits(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((predicted == np.asarray(y)).mean())


def int8_verdict(fp32: float, int8: float, max_drop: float) -> tuple[bool, str]:
    """Whether the int8 model may be used: its test accuracy at most max_drop below the fp32 model's; and why."""
    drop = fp32 - int8
    said = f"test accuracy {int8:.4f} against {fp32:.4f} in fp32, a drop of {drop * 100:.2f} points"
    if drop > max_drop + 1e-12:
        return False, f"{said}, more than export.int8_max_drop allows ({max_drop * 100:.2f})"
    return True, f"{said}, within export.int8_max_drop ({max_drop * 100:.2f})"
