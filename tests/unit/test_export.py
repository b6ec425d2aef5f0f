"""ONNX export: parity with the torch model, a dynamic batch, self-describing files, one-sentence failures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch

from flows.contracts import ModelMeta
from flows.contracts.settings import Settings
from flows.core import export
from flows.core.augment import Normalizer
from flows.core.calibration import softmax
from flows.core.errors import TunedeckError
from flows.core.export import OnnxClassifier, check_parity, export_onnx, parity_images
from flows.core.model import build_model
from flows.core.model_file import load_model, read_meta, save_model
from flows.core.params import parse_params
from flows.core.prepare import load_split, prepare
from flows.core.train import train
from tests.conftest import tiny_params_dict, write_images

SIZE, CLASSES = 32, ["zero", "one", "two", "three", "four"]


def tiny_model_file(path: Path, seed: int) -> ModelMeta:
    """A random test_resnet saved as the train stage saves it; batch-norm statistics away from
    their defaults so every layer matters (a fresh timm resnet zeroes its last norm per block)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(CLASSES))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    meta = ModelMeta(model_name="test_resnet", classes=CLASSES, image_size=SIZE, mean=[0.485, 0.456, 0.406],
                     std=[0.229, 0.224, 0.225], interpolation="bicubic", data_version="d" * 32, temperature=1.5)
    save_model(path, model.state_dict(), meta)
    return meta


def images(n: int, seed: int = 0) -> np.ndarray:
    """n synthetic uint8 NHWC images, as prepare stores them."""
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and message.count(". ") == 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, ModelMeta]:
    """(model file, its export, its meta), exported once for the module."""
    folder = tmp_path_factory.mktemp("export")
    meta = tiny_model_file(folder / "model.safetensors", seed=0)
    return folder / "model.safetensors", export_onnx(folder / "model.safetensors", folder / "out" / "model.onnx", 18), meta


def test_export_matches_torch_at_batch_1_and_7(exported):
    model_path, onnx_path, _ = exported
    report = check_parity(model_path, onnx_path, images(10), batch_sizes=(1, 7), max_prob_diff=1e-4)
    assert report["top1_agreement"] == 1.0
    assert report["max_prob_diff"] <= 1e-4
    assert report["images"] == 10 and report["batch_sizes"] == [1, 7]
    assert report["opset"] == 18 and report["exporter"] in export.EXPORTERS
    assert [p.name for p in onnx_path.parent.iterdir()] == ["model.onnx"]  # no temp or external-data file left


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """(a test_resnet trained by flows.core.train on the tiny image folder, its random initialisation
    saved with the same meta, every prepared image): trained a few epochs so its softmax is peaked.

    No validation split: the best epoch is then the lowest training loss (with one, the first epoch
    at val accuracy 1.0 wins, barely trained), and the temperature stays 1.0 (the raw softmax).
    """
    folder = tmp_path_factory.mktemp("trained")
    raw = tiny_params_dict(str(write_images(folder / "images", {"cat": 12, "dog": 12, "fox": 12})))
    raw["data"].update(val_fraction=0.0, test_fraction=0.3)
    raw["train"].update(epochs=4, lr=0.02)
    params = parse_params(raw)
    prepare(params, folder / "prepared")
    train(params, folder / "prepared", folder / "models")
    torch.manual_seed(params.base.seed)  # the Trainer's own start: the same seed, the same build
    start, _ = build_model(params.model, 3)
    save_model(folder / "init.safetensors", start.state_dict(), read_meta(folder / "models" / "model.safetensors"))
    every = np.concatenate([np.asarray(load_split(folder / "prepared", s)[0]) for s in ("train", "test")])
    return folder / "models" / "model.safetensors", folder / "init.safetensors", every


def probabilities(model_path: Path, onnx_path: Path, x_uint8: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """softmax(logits / T) of the torch model and of its ONNX export, both fed `batch` images at a time."""
    model, meta = load_model(model_path, "cpu")
    with torch.no_grad():
        x = Normalizer(meta.mean, meta.std, torch.device("cpu"))(torch.from_numpy(x_uint8))
        ours = np.concatenate([model(part).numpy() for part in x.split(batch)])
    classifier = OnnxClassifier(onnx_path, threads=1)
    theirs = np.concatenate([classifier.logits(part.numpy()) for part in x.split(batch)])
    return softmax(ours, meta.temperature), softmax(theirs, meta.temperature)


def test_a_trained_models_export_matches_torch_at_batch_1_and_7(trained, tmp_path):
    """Parity on weights that training moved (peaked softmax, BatchNorm statistics of real data), not only on noise.

    Tolerance 1e-4 on probabilities: export.max_prob_diff's default; torch and onnxruntime run the same
    fp32 graph with other kernels (other summation orders), which moves a probability by ~1e-7.
    Top-1 must agree exactly: every image's winning probability is far above the runner-up.
    """
    model_path, init_path, x = trained
    confidence = {}
    for name, path in (("trained", model_path), ("init", init_path)):
        model, meta = load_model(path, "cpu")
        with torch.no_grad():
            logits = model(Normalizer(meta.mean, meta.std, torch.device("cpu"))(torch.from_numpy(x))).numpy()
        confidence[name] = float(softmax(logits, meta.temperature).max(1).mean())
    # trained: at least halfway from the random start's (near-uniform) confidence to certainty
    assert confidence["trained"] >= confidence["init"] + 0.5 * (1 - confidence["init"]), confidence

    onnx_path = export_onnx(model_path, tmp_path / "model.onnx", 18)
    report = check_parity(model_path, onnx_path, x, batch_sizes=(1, 7), max_prob_diff=1e-4)
    assert report["top1_agreement"] == 1.0 and report["max_prob_diff"] <= 1e-4 and report["images"] == len(x)
    worst = 0.0
    for batch in (1, 7):  # 36 images: at 7, five whole batches and a short one
        p, q = probabilities(model_path, onnx_path, x, batch)
        assert np.array_equal(p.argmax(1), q.argmax(1)), batch
        worst = max(worst, float(np.abs(p - q).max()))
    print(f"\nmean max softmax {confidence}; max |p_torch - p_onnx| at batch 1 and 7: {worst:.2e}")
    assert worst <= 1e-4, worst


def test_batch_dimension_is_dynamic(exported):
    model_path, onnx_path, meta = exported
    from flows.core.augment import Normalizer
    from flows.core.calibration import softmax
    from flows.core.model_file import load_model

    model, _ = load_model(model_path, "cpu")
    classifier = OnnxClassifier(onnx_path, threads=1)
    assert isinstance(classifier.session.get_inputs()[0].shape[0], str)  # symbolic, not a number
    norm = Normalizer(meta.mean, meta.std, torch.device("cpu"))
    for n in (3, 11):
        with torch.no_grad():
            x = norm(torch.from_numpy(images(n, seed=n)))
            expected = model(x).numpy()
        logits = classifier.logits(x.numpy())
        assert logits.shape == (n, len(CLASSES)) and logits.dtype == np.float32
        assert np.abs(softmax(logits, meta.temperature) - softmax(expected, meta.temperature)).max() <= 1e-4


def test_classifier_reads_the_meta_back(exported):
    _, onnx_path, meta = exported
    assert OnnxClassifier(onnx_path).meta == meta
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert ModelMeta.model_validate_json(props["tunedeck.model"]) == meta


def test_export_prints_nothing(tmp_path, capfd):
    tiny_model_file(tmp_path / "model.safetensors", seed=2)
    export_onnx(tmp_path / "model.safetensors", tmp_path / "model.onnx", 17)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert export.onnx_opset(tmp_path / "model.onnx") == 17


def test_an_export_of_other_weights_fails_parity_in_one_sentence(exported, tmp_path):
    model_path, _, _ = exported
    tiny_model_file(tmp_path / "other.safetensors", seed=1)
    other = export_onnx(tmp_path / "other.safetensors", tmp_path / "other.onnx", 18)
    with pytest.raises(TunedeckError, match=r"disagrees with the torch model .* on \d of the 8 images checked") as err:
        check_parity(model_path, other, images(8))
    assert one_sentence(str(err.value))


def test_missing_garbage_and_foreign_onnx_files(tmp_path):
    with pytest.raises(TunedeckError, match="not found") as missing:
        OnnxClassifier(tmp_path / "absent.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not a model" * 50)
    with pytest.raises(TunedeckError, match="is not a readable ONNX model") as garbage:
        OnnxClassifier(tmp_path / "garbage.onnx")
    node = onnx.helper.make_node("Identity", ["images"], ["logits"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("images", onnx.TensorProto.FLOAT, [1])],
                                   [value("logits", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), tmp_path / "plain.onnx")
    with pytest.raises(TunedeckError, match="has no tunedeck metadata") as foreign:
        OnnxClassifier(tmp_path / "plain.onnx")
    assert all(one_sentence(str(e.value)) for e in (missing, garbage, foreign))


def test_when_every_exporter_fails_one_sentence_names_them(exported, tmp_path, monkeypatch):
    model_path, _, _ = exported

    def broken(*_):
        raise RuntimeError("Exporting the operator 'aten::magic' is not supported\n" + "graph dump\n" * 1000)

    monkeypatch.setattr(export, "EXPORTERS", {"torchscript": broken, "dynamo": broken})
    with pytest.raises(TunedeckError, match=r"could not be exported to ONNX opset 18 \(torchscript: .*aten::magic") as err:
        export_onnx(model_path, tmp_path / "model.onnx", 18)
    assert one_sentence(str(err.value)) and len(str(err.value)) < 600
    assert list(tmp_path.iterdir()) == []  # no partial file


def test_torch_export_takes_over_when_tracing_fails(exported, tmp_path, monkeypatch, capfd, caplog):
    model_path, _, _ = exported

    def tracing_fails(*_):
        raise RuntimeError("Exporting the operator 'aten::rms_norm' to ONNX opset version 18 is not supported")

    monkeypatch.setattr(export, "EXPORTERS", {"torchscript": tracing_fails, "dynamo": export._dynamo})
    # tunedeck's warning into caplog only: once Prefect is imported (any module importing it, at collection),
    # its console handler on the root logger prints every WARNING to stderr, and with `pytest -s` to this fd
    tunedeck_log = logging.getLogger("tunedeck")
    monkeypatch.setattr(tunedeck_log, "handlers", [caplog.handler])
    monkeypatch.setattr(tunedeck_log, "propagate", False)
    onnx_path = export_onnx(model_path, tmp_path / "model.onnx", 18)
    assert capfd.readouterr() == ("", "")  # torch.export's progress lines stay quiet too
    assert "exported with dynamo instead" in caplog.text  # the fallback is said, as a log record
    report = check_parity(model_path, onnx_path, images(8), batch_sizes=(1, 3))
    assert report["exporter"] == "dynamo" and report["top1_agreement"] == 1.0 and report["max_prob_diff"] <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # its external data folded into the one file


def test_parity_images_fall_back_to_test_then_fail(tmp_path):
    np.save(tmp_path / "val_x.npy", np.zeros((0, SIZE, SIZE, 3), np.uint8))
    np.save(tmp_path / "val_y.npy", np.zeros(0, np.int64))
    np.save(tmp_path / "test_x.npy", images(3))
    np.save(tmp_path / "test_y.npy", np.zeros(3, np.int64))
    assert parity_images(tmp_path).shape == (3, SIZE, SIZE, 3)
    with pytest.raises(TunedeckError, match="has no validation or test images") as err:
        parity_images(tmp_path / "nothing")
    assert one_sentence(str(err.value))


def test_images_of_another_size_are_refused_in_one_sentence(exported):
    model_path, onnx_path, _ = exported
    small = np.zeros((2, 16, 16, 3), np.uint8)
    with pytest.raises(TunedeckError, match="are 16x16x3, but .* takes 32x32x3") as err:
        check_parity(model_path, onnx_path, small)
    assert one_sentence(str(err.value))


@pytest.fixture
def stage_project(tmp_path, monkeypatch):
    """A project folder with a trained model and prepared validation images; the stage's params."""
    from flows.core.params import parse_params
    from tests.conftest import tiny_params_dict

    monkeypatch.chdir(tmp_path)
    Path("models").mkdir()
    tiny_model_file(Path("models/model.safetensors"), seed=3)
    Path("data/prepared").mkdir(parents=True)
    np.save("data/prepared/val_x.npy", images(9))
    np.save("data/prepared/val_y.npy", np.zeros(9, np.int64))
    return parse_params(tiny_params_dict("data/demo"))


def test_stage_writes_the_export_and_its_parity(stage_project):
    from flows.stages import export as stage

    summary = stage.work(stage_project, Settings())
    parity = json.loads(Path("export/parity.json").read_text())
    assert summary["top1_agreement"] == parity["top1_agreement"] == 1.0
    assert parity["images"] == 9 and parity["max_prob_diff"] <= parity["max_prob_diff_allowed"]
    assert OnnxClassifier(Path("export/model.onnx")).meta.classes == CLASSES


def test_stage_removes_an_export_that_fails_its_check(stage_project, monkeypatch):
    from flows.stages import export as stage

    def disagrees(*_, **__):
        raise TunedeckError("the ONNX export disagrees.")

    monkeypatch.setattr(export, "check_parity", disagrees)
    Path("export").mkdir()
    Path("export/parity.json").write_text("{}")  # an earlier run's
    with pytest.raises(TunedeckError, match="disagrees"):
        stage.work(stage_project, Settings())
    assert not Path("export/model.onnx").exists() and not Path("export/parity.json").exists()
