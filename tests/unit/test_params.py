"""params.yaml: frozen typed groups; every bad value is one sentence naming the key."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from flows.core.errors import TunedeckError
from flows.core.params import load_params, parse_params, save_resolved
from tests.conftest import ROOT, tiny_params_dict


def test_project_params_load_and_are_frozen():
    params = load_params(ROOT / "params.yaml")
    assert params.model.name == "resnet18"
    with pytest.raises(ValidationError):
        params.train.lr = 1.0  # type: ignore[misc]


def bad(raw_change, tmp_path):
    raw = tiny_params_dict("x")
    raw_change(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TunedeckError) as err:
        load_params(path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests_the_close_one(tmp_path):
    msg = bad(lambda r: r["train"].update(lrr=0.1), tmp_path)
    assert "unknown key 'train.lrr'" in msg and "did you mean 'train.lr'" in msg


def test_unknown_group(tmp_path):
    msg = bad(lambda r: r.update(trian={"lr": 1}), tmp_path)
    assert "unknown key 'trian'" in msg and "did you mean 'train'" in msg


def test_wrong_type(tmp_path):
    msg = bad(lambda r: r["train"].update(epochs="ten"), tmp_path)
    assert msg.startswith(f"{tmp_path / 'params.yaml'}: train.epochs must be a valid integer")


@pytest.mark.parametrize(("group", "key"), [("train", "batch_size"), ("train", "lr"), ("data", "limit_per_class")])
def test_true_or_false_is_not_a_number(tmp_path, group, key):
    msg = bad(lambda r: r[group].update({key: True}), tmp_path)
    assert msg == f"{tmp_path / 'params.yaml'}: {group}.{key} must be a number, not true/false (got True)."


@pytest.mark.parametrize("lr", [0, -0.1])
def test_lr_must_be_positive(tmp_path, lr):
    msg = bad(lambda r: r["train"].update(lr=lr), tmp_path)
    assert "train.lr must be greater than 0" in msg


def test_missing_key(tmp_path):
    msg = bad(lambda r: r["data"].pop("source"), tmp_path)
    assert "key 'data.source' is missing" in msg


def test_pretrained_forms():
    for value in (True, False, "weights/a.safetensors", "w.pth"):
        raw = tiny_params_dict("x")
        raw["model"]["pretrained"] = value
        assert parse_params(raw).model.pretrained == value
    raw = tiny_params_dict("x")
    raw["model"]["pretrained"] = "weights/a.txt"
    with pytest.raises(TunedeckError, match="model.pretrained must be true, false, or a path"):
        parse_params(raw)


def test_yaml_written_by_people_parses():
    raw = tiny_params_dict("x")
    raw["train"]["lr"] = "1e-3"  # PyYAML reads 1e-3 as a string
    assert parse_params(raw).train.lr == pytest.approx(1e-3)


def test_broken_yaml_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [1,\n")
    with pytest.raises(TunedeckError, match="is not valid YAML at line"):
        load_params(path)
    with pytest.raises(TunedeckError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_bad_device(tmp_path):
    msg = bad(lambda r: r["base"].update(device="gpu0"), tmp_path)
    assert "base.device must be one of auto, cpu, mps, cuda, cuda:N" in msg


def test_resolved_params_saved_with_defaults(tmp_path, tiny_params):
    out = save_resolved(tiny_params, tmp_path / "out")
    saved = yaml.safe_load(out.read_text())
    assert saved["train"]["optimizer"] == "adamw" and saved["model"]["name"] == "test_resnet"
    assert parse_params(saved) == tiny_params


def test_fractions_must_leave_images_to_train(tmp_path):
    msg = bad(lambda r: r["data"].update(val_fraction=0.5, test_fraction=0.5), tmp_path)
    assert "must leave at least 5 % of the images to train on" in msg
