"""Runtimes besides torch (flows.core.runtimes): OpenVINO held to torch's outputs on a trained model, and the int8
model quantised after training, kept or refused at export by its measured test accuracy cost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.contracts.settings import Settings
from flows.core.augment import Normalizer
from flows.core.calibration import softmax
from flows.core.errors import TunedeckError
from flows.core.export import OnnxClassifier, check_parity, export_onnx
from flows.core.model_file import load_model
from flows.core.runtimes import OpenVinoClassifier, accuracy, int8_verdict, quantize_int8
from tests.unit.test_export import images, stage_project  # noqa: F401 - a helper and a fixture


@pytest.fixture(scope="module")
def trained32(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A test_resnet trained a few epochs at 32 px (at 16 px its last block pools a 1x1 map with a 2x2 kernel, which
    torch allows and OpenVINO refuses: test_openvino_refuses...), and its prepared images."""
    from flows.core.params import parse_params
    from flows.core.prepare import load_split, prepare
    from flows.core.train import train
    from tests.conftest import tiny_params_dict, write_images

    folder = tmp_path_factory.mktemp("trained32")
    raw = tiny_params_dict(str(write_images(folder / "images", {"cat": 12, "dog": 12, "fox": 12})))
    raw["data"].update(val_fraction=0.0, test_fraction=0.3, image_size=32)
    raw["train"].update(epochs=4, lr=0.02)
    params = parse_params(raw)
    prepare(params, folder / "prepared")
    train(params, folder / "prepared", folder / "models")
    every = np.concatenate([np.asarray(load_split(folder / "prepared", s)[0]) for s in ("train", "test")])
    return folder / "models" / "model.safetensors", every


def normalised(model_path: Path, x: np.ndarray) -> np.ndarray:
    _, meta = load_model(model_path, "cpu")
    with torch.no_grad():
        return Normalizer(meta.mean, meta.std, torch.device("cpu"))(torch.from_numpy(x)).numpy()


def test_openvino_runs_a_trained_export_as_torch_does_at_batch_1_and_7(trained32, tmp_path):
    """The export stage's parity check, with OpenVINO running the ONNX file: top-1 equal on every image and
    probabilities within export.max_prob_diff's default, at batch 1 and 7; and OpenVINO's own CPU default (bf16
    on CPUs that have it) would not be held: the classifier compiles in f32."""
    model_path, x = trained32
    onnx_path = export_onnx(model_path, tmp_path / "model.onnx", 18)
    classifier = OpenVinoClassifier(onnx_path)
    report = check_parity(model_path, onnx_path, x, batch_sizes=(1, 7), max_prob_diff=1e-4, run=classifier.logits)
    assert report["top1_agreement"] == 1.0 and report["max_prob_diff"] <= 1e-4 and report["images"] == len(x)
    assert classifier.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    assert classifier.meta == OnnxClassifier(onnx_path).meta
    inputs = normalised(model_path, x)
    model, meta = load_model(model_path, "cpu")
    with torch.no_grad():
        ours = softmax(model(torch.from_numpy(inputs)).numpy(), meta.temperature)
    theirs = softmax(np.concatenate([classifier.logits(inputs[i:i + 7]) for i in range(0, len(x), 7)]), meta.temperature)
    assert np.array_equal(ours.argmax(1), theirs.argmax(1)) and np.abs(ours - theirs).max() <= 1e-4


def test_an_int8_model_keeps_the_exports_metadata_and_its_accuracy_is_measured_against_fp32(trained32, tmp_path):
    model_path, x = trained32
    onnx_path = export_onnx(model_path, tmp_path / "model.onnx", 18)
    inputs = normalised(model_path, x)
    int8_path = quantize_int8(onnx_path, tmp_path / "int8" / "model.onnx", inputs[:16])
    fp32, int8 = OnnxClassifier(onnx_path), OnnxClassifier(int8_path)
    assert int8.meta == fp32.meta
    assert any(node.op_type == "QuantizeLinear" for node in __import__("onnx").load(str(int8_path)).graph.node)
    labels = fp32.logits(inputs).argmax(1)  # fp32's own top-1 as the labels: fp32 scores 1.0 on them
    assert accuracy(fp32.logits, inputs, labels, batch=5) == 1.0
    agreement = accuracy(int8.logits, inputs, labels, batch=5)
    assert agreement == float((int8.logits(inputs).argmax(1) == labels).mean())
    assert OpenVinoClassifier(int8_path).logits(inputs[:3]).shape == (3, len(fp32.meta.classes))  # OpenVINO runs it


def test_the_int8_verdict_keeps_a_drop_up_to_the_tolerance_and_refuses_one_beyond():
    assert int8_verdict(0.90, 0.89, 0.01)[0] is True  # just inside
    assert int8_verdict(0.90, 0.8899, 0.01)[0] is False  # just outside
    assert int8_verdict(0.90, 0.95, 0.0)[0] is True  # better is never refused
    kept, why = int8_verdict(0.9, 0.5, 0.01)
    assert not kept and "40.00 points" in why and "export.int8_max_drop" in why


def with_test_split(n: int = 12) -> None:
    np.save("data/prepared/test_x.npy", images(n, seed=5))
    np.save("data/prepared/test_y.npy", np.arange(n, dtype=np.int64) % 5)


def card(meta) -> None:
    """models/model.json for the stage project's model file, as the train stage writes it."""
    from flows.contracts import ModelCard
    from flows.core.model_file import sha256

    ModelCard(**meta.model_dump(), weights_from="random", best_epoch=1, val_accuracy=None, weights="raw", micro_batch=8,
              accum_steps=1, sha256=sha256(Path("models/model.safetensors")), train_seconds=1.0).write(Path("models"))


def test_the_export_stage_keeps_an_int8_model_within_the_tolerance_and_predict_runs_it(stage_project):  # noqa: F811
    from flows.core.predict import OnnxBackend
    from flows.ship.predict import int8_for
    from flows.stages import export as stage

    with_test_split()
    params = stage_project.model_copy(update={"export": stage_project.export.model_copy(update={"int8": True, "int8_max_drop": 1.0})})
    summary = stage.work(params, Settings())
    report = json.loads(Path("export/int8/report.json").read_text())
    assert summary["int8"] == "accepted" and report["accepted"] and report["test_images"] == 12, report
    assert report["fp32_accuracy"] - report["int8_accuracy"] <= 1.0 and Path("export/int8/model.onnx").is_file()
    assert "refused" not in json.loads(Path("export/parity.json").read_text())["openvino"]
    card(OnnxClassifier(Path("export/model.onnx")).meta)
    found = int8_for(Path.cwd(), Path("models/model.safetensors"), "file")
    assert found == Path.cwd() / "export/int8/model.onnx"
    for runtime in ("onnxruntime", "openvino"):
        backend = OnnxBackend(found, runtime=runtime)
        x = np.stack([backend.prepare(i) for i in images(3)])
        assert backend.logits(x).shape == (3, 5)


def test_an_int8_model_beyond_the_tolerance_is_refused_and_predict_says_why(stage_project, monkeypatch):  # noqa: F811
    from flows.core import runtimes
    from flows.stages import export as stage

    with_test_split()
    scores = iter([0.9, 0.5])  # the fp32 export's test accuracy, then the int8 model's
    monkeypatch.setattr(runtimes, "accuracy", lambda *_a, **_k: next(scores))
    params = stage_project.model_copy(update={"export": stage_project.export.model_copy(update={"int8": True})})
    assert stage.work(params, Settings())["int8"] == "refused"
    report = json.loads(Path("export/int8/report.json").read_text())
    assert not report["accepted"] and "40.00 points" in report["reason"] and not Path("export/int8/model.onnx").exists()
    from flows.ship.predict import int8_for

    card(OnnxClassifier(Path("export/model.onnx")).meta)
    with pytest.raises(TunedeckError, match="the export stage refused it: .*40.00 points"):
        int8_for(Path.cwd(), Path("models/model.safetensors"), "file")
    assert stage.work(stage_project, Settings())["int8"] == "off"  # int8 off: the refused report goes too
    assert json.loads(Path("export/int8/report.json").read_text()) == {"enabled": False, "accepted": False}
    with pytest.raises(TunedeckError, match=r"no int8 model \(export.int8 is off\)"):
        int8_for(Path.cwd(), Path("models/model.safetensors"), "file")


def test_openvino_refuses_a_missing_or_garbage_file_or_a_graph_it_cannot_run_in_one_sentence(tmp_path):
    """A 16 px test_resnet pools a 1x1 map with a 2x2 kernel in its last block: torch runs it, OpenVINO refuses, and
    says why in one sentence (the export stage then refuses OpenVINO, not the export)."""
    from tests.unit.test_export import tiny_model_file

    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    tiny = tiny_model_file(tmp_path / "tiny.safetensors", seed=0).model_copy(update={"image_size": 16})
    from flows.core.model_file import save_model

    model, _ = load_model(tmp_path / "tiny.safetensors", "cpu")
    save_model(tmp_path / "tiny16.safetensors", model.state_dict(), tiny)
    small = export_onnx(tmp_path / "tiny16.safetensors", tmp_path / "tiny16.onnx", 18)
    for path, why in ((tmp_path / "missing.onnx", "not found"), (tmp_path / "garbage.onnx", "not a readable ONNX"),
                      (small, "Kernel after dilation")):
        with pytest.raises(TunedeckError) as err:
            OpenVinoClassifier(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value) and why in str(err.value), err.value
