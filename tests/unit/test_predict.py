"""Batch prediction: prepare's decoding, the model run directly, failures kept, tables that read back."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flows.contracts import ModelMeta
from flows.core.augment import Normalizer
from flows.core.calibration import softmax
from flows.core.errors import TunedeckError
from flows.core.images import decode_image
from flows.core.model_file import load_model, save_model, sha256
from flows.core.predict import (
    HostNormalizer,
    Predictions,
    TorchBackend,
    list_images,
    predict,
    write_predictions,
)

CLASSES = ["cat", "dog", "fox"]
SIZE = 32


def model_file(folder: Path, temperature: float = 1.0) -> Path:
    """A seeded random test_resnet as the train stage saves it; its head scaled up so top-1 is never a near tie."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(CLASSES))
    with torch.no_grad():
        model.get_classifier().weight.mul_(20)
    meta = ModelMeta(model_name="test_resnet", classes=CLASSES, image_size=SIZE, mean=[0.485, 0.456, 0.406],
                     std=[0.229, 0.224, 0.225], interpolation="bicubic", data_version="test", temperature=temperature)
    path = folder / f"model-t{temperature}.safetensors"
    save_model(path, {k: v.contiguous() for k, v in model.state_dict().items()}, meta)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return model_file(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Nine JPEGs and PNGs of several sizes (one in a sub-folder), one broken JPEG, and files to skip."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (folder / "more").mkdir()
    for i in range(9):
        h, w = (30 + 7 * i, 50 - 2 * i)
        colour = np.zeros((h, w, 3), dtype=np.uint8)
        colour[..., i % 3] = 60 + 20 * i
        pixels = colour + rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        name = folder / ("more" if i == 4 else "") / (f"img{i}.png" if i % 2 else f"img{i}.jpg")
        Image.fromarray(pixels).save(name)
    (folder / "img8.jpg").rename(folder / "img8.JPG")
    good = (folder / "img0.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(good[: len(good) // 3])
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / ".hidden.png")
    return folder


def expected_logits(model_path: Path, files: list[Path]) -> np.ndarray:
    """The model run directly: prepare's decode_image, augment's Normalizer, one image at a time."""
    model, meta = load_model(model_path)
    norm = Normalizer(meta.mean, meta.std, torch.device("cpu"))
    with torch.no_grad():
        return np.concatenate([model(norm(torch.from_numpy(np.array(decode_image(f, SIZE)[None])))).numpy() for f in files])


def test_list_images_finds_images_recursively_and_sorted(photos):
    names = [p.relative_to(photos).as_posix() for p in list_images(photos)]
    assert names == ["broken.jpg", "img0.jpg", "img1.png", "img2.jpg", "img3.png", "img5.png", "img6.jpg", "img7.png",
                     "img8.JPG", "more/img4.jpg"]


@pytest.mark.parametrize("make, expected", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: (root / "f.png").write_bytes(b"x") and root / "f.png", "is a file, not a folder"),
    (lambda root: (root / "docs").mkdir() or (root / "docs" / "a.txt").write_text("x") and root / "docs", "has no image files"),
])
def test_unusable_folders_are_one_sentence(tmp_path, make, expected):
    with pytest.raises(TunedeckError) as err:
        list_images(make(tmp_path))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_host_normalizer_gives_the_normalizers_floats_bit_for_bit(model_path, photos):
    meta = load_model(model_path)[1]
    image = np.array(decode_image(photos / "img1.png", SIZE))
    ours = torch.from_numpy(HostNormalizer(meta)(image)[None]).permute(0, 3, 1, 2)
    assert torch.equal(ours, Normalizer(meta.mean, meta.std, torch.device("cpu"))(torch.from_numpy(image[None])))


def test_predictions_are_the_models_own_on_prepares_decoding(model_path, photos):
    files = list_images(photos)
    seen = []
    pred = predict(files, TorchBackend(model_path, "cpu"), batch_size=4, top_k=2, workers=2,
                   progress=lambda done, total: seen.append((done, total)), root=photos, model_version="v0.1.0")
    good = [f for f in files if f.name != "broken.jpg"]
    probs = softmax(expected_logits(model_path, good))
    assert [r.path for r in pred.rows] == [f.relative_to(photos).as_posix() for f in good]
    assert [r.label for r in pred.rows] == [CLASSES[i] for i in probs.argmax(1)]
    np.testing.assert_allclose([r.confidence for r in pred.rows], probs.max(1), atol=1e-5)
    assert len(pred.failures) == 1 and pred.failures[0].path == "broken.jpg"
    assert pred.failures[0].reason.startswith("broken image")
    for row in pred.rows:
        assert row.topk_labels[0] == row.label and len(row.topk_labels) == 2 and row.topk_probs[0] >= row.topk_probs[1]
    assert (pred.model_version, pred.model_sha256) == ("v0.1.0", sha256(model_path))
    assert seen[-1] == (len(files), len(files)) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_temperature_changes_confidence_not_labels(model_path, photos, tmp_path):
    files = list_images(photos)
    plain = predict(files, TorchBackend(model_path), batch_size=8, top_k=3, workers=1)
    warm = predict(files, TorchBackend(model_file(tmp_path, temperature=3.0)), batch_size=8, top_k=3, workers=1)
    assert [r.label for r in warm.rows] == [r.label for r in plain.rows]
    assert all(w.confidence < p.confidence for w, p in zip(warm.rows, plain.rows, strict=True))


def test_csv_and_parquet_read_back(model_path, photos, tmp_path):
    pred = predict(list_images(photos), TorchBackend(model_path), batch_size=4, top_k=3, workers=2, root=photos)
    write_predictions(pred, tmp_path / "out.csv")
    write_predictions(pred, tmp_path / "out.parquet")
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == [r.path for r in pred.rows] and [r["label"] for r in rows] == [r.label for r in pred.rows]
    for text, row in zip(rows, pred.rows, strict=True):
        assert abs(float(text["confidence"]) - row.confidence) < 1e-6 and text["model_sha256"] == pred.model_sha256
        pairs = [item.split(":") for item in text["topk"].split(";")]
        assert [p[0] for p in pairs] == list(row.topk_labels)
        np.testing.assert_allclose([float(p[1]) for p in pairs], row.topk_probs, atol=1e-4)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.field("topk_labels").type == pa.list_(pa.string())
    assert table.schema.field("topk_probs").type == pa.list_(pa.float32())
    assert table.column("label").to_pylist() == [r.label for r in pred.rows]
    np.testing.assert_allclose(table.column("topk_probs").to_pylist(), [r.topk_probs for r in pred.rows], rtol=1e-6)
    with open(tmp_path / "out.errors.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == [{"path": "broken.jpg", "reason": pred.failures[0].reason}]
    write_predictions(Predictions(pred.rows, [], pred.model_version, pred.model_sha256), tmp_path / "out.csv")
    assert not (tmp_path / "out.errors.csv").exists(), "a clean run must not leave an earlier run's failures beside it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv", "out.parquet"], "no temporary files left"


def test_unknown_output_suffix_is_one_sentence(tmp_path):
    with pytest.raises(TunedeckError) as err:
        write_predictions(Predictions([], [], "file", "0" * 64), tmp_path / "out.json")
    assert "out.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_onnx_and_openvino_backends_agree_with_torch_on_top1(model_path, photos, tmp_path, runtime):
    from flows.core import export
    from flows.core.predict import OnnxBackend

    onnx_path = tmp_path / "model.onnx"
    export.export_onnx(model_path, onnx_path, 18)
    files = list_images(photos)
    ours = predict(files, TorchBackend(model_path), batch_size=4, top_k=3, workers=2)
    theirs = predict(files, OnnxBackend(onnx_path, runtime=runtime), batch_size=4, top_k=3, workers=2)
    assert [r.label for r in theirs.rows] == [r.label for r in ours.rows]
    np.testing.assert_allclose([r.topk_probs for r in theirs.rows], [r.topk_probs for r in ours.rows], atol=1e-4)
    assert [f.path for f in theirs.failures] == [f.path for f in ours.failures]


def test_every_kind_of_unreadable_file_is_a_failure_not_the_end(model_path, tmp_path, monkeypatch):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(folder / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 is over twice the limit: Pillow refuses it
    seen = []
    pred = predict(list_images(folder), TorchBackend(model_path), batch_size=2, workers=2, root=folder,
                   progress=lambda done, total: seen.append((done, total)))
    reasons = {f.path: f.reason for f in pred.failures}
    assert reasons["empty.png"] == "empty file (0 bytes)" and reasons["text.jpg"] == "not an image"
    assert reasons["huge.png"].startswith("too large to decode safely")
    assert pred.rows == [] and seen == [(3, 3)]
    write_predictions(pred, tmp_path / "none.parquet")
    assert pq.read_table(tmp_path / "none.parquet").num_rows == 0 and (tmp_path / "none.errors.csv").is_file()


def test_normalising_on_the_device_as_for_a_gpu_gives_the_same_predictions(model_path, photos):
    """On a GPU the decode threads hand over uint8 and augment.Normalizer runs on the device; here on the CPU."""
    files = list_images(photos)
    host = predict(files, TorchBackend(model_path), batch_size=4, workers=2)
    device_side = TorchBackend(model_path)
    device_side.host_norm = None
    on_device = predict(files, device_side, batch_size=4, workers=2)
    assert [r.label for r in on_device.rows] == [r.label for r in host.rows]
    np.testing.assert_allclose([r.topk_probs for r in on_device.rows], [r.topk_probs for r in host.rows], atol=1e-6)


def test_prior_shift_rows_are_the_em_correction_of_the_plain_rows_in_the_same_order(model_path, photos):
    from flows.core.estimate import em_priors

    files = list_images(photos)
    source = np.full(len(CLASSES), 1.0 / len(CLASSES))
    plain = predict(files, TorchBackend(model_path), batch_size=4, top_k=len(CLASSES), workers=1)
    shifted = predict(files, TorchBackend(model_path), batch_size=4, top_k=len(CLASSES), workers=1, source_priors=source)
    good = [f for f in files if f.name != "broken.jpg"]
    priors, corrected = em_priors(softmax(expected_logits(model_path, good)), source)
    assert [r.path for r in shifted.rows] == [r.path for r in plain.rows] and len(shifted.failures) == 1
    assert [r.label for r in shifted.rows] == [CLASSES[i] for i in corrected.argmax(1)]
    np.testing.assert_allclose([r.confidence for r in shifted.rows], corrected.max(1), atol=1e-5)
    assert shifted.priors == pytest.approx(dict(zip(CLASSES, priors, strict=True)), abs=1e-6) and plain.priors is None


def test_prior_shift_with_a_model_file_that_has_no_reference_is_one_sentence(model_path, tmp_path):
    from flows.ship.predict import training_priors

    with pytest.raises(TunedeckError, match=r"comes with no held-out reference, so the class mix it was trained on is "
                                            r"unknown: use --prior-shift with the prod model or a registry version\.$"):
        training_priors(tmp_path, model_path, "file")
