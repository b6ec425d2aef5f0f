"""Building a timm backbone and loading its starting weights from each model.pretrained form."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from flows.core.errors import TunedeckError
from flows.core.model import build_model, check_model_name, preprocessing
from flows.core.params import ModelParams

HUB_ID = "timm/test_resnet.r160_in1k"


def source_weights(num_classes: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return timm.create_model("test_resnet", num_classes=num_classes).state_dict()


def backbone_equal(model, state) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_build_replaces_the_head():
    model, note = build_model(ModelParams(name="test_resnet", pretrained=False), 4)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert "random initialisation" in note
    prep = preprocessing(model)
    assert len(prep.mean) == 3 and len(prep.std) == 3


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(TunedeckError, match="is not a timm model: did you mean resnet18"):
        check_model_name("resnet81")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads_backbone_and_keeps_new_head(tmp_path, suffix):
    state = source_weights()
    path = tmp_path / f"src{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model, note = build_model(ModelParams(name="test_resnet", pretrained=str(path)), 3)
    assert backbone_equal(model, state)
    assert model.state_dict()["fc.weight"].shape[0] == 3
    assert "new head for 3 classes" in note


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=3).state_dict(), str(path))
    with pytest.raises(TunedeckError, match="does not fit model.name 'test_resnet'"):
        build_model(ModelParams(name="test_resnet", pretrained=str(path)), 3)


def test_unreadable_and_missing_weights_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights")
    with pytest.raises(TunedeckError, match="could not be read"):
        build_model(ModelParams(name="test_resnet", pretrained=str(junk)), 3)
    with pytest.raises(TunedeckError, match="does not exist"):
        build_model(ModelParams(name="test_resnet", pretrained=str(tmp_path / "none.pth")), 3)


def test_pickled_code_is_not_loaded(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": source_weights(), "hook": Path("x")}, path)
    from flows.core.weights import read_state_dict

    with pytest.raises(TunedeckError, match="could not be read"):
        read_state_dict(path)


def test_pretrained_true_offline_with_empty_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TunedeckError) as err:  # how soon: bench/responsiveness.py
        build_model(ModelParams(name="test_resnet", pretrained=True), 3)
    assert "not in the Hugging Face cache" in str(err.value) and HUB_ID in str(err.value)


def test_pretrained_true_loads_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """The real timm + huggingface_hub path, on weights this test writes into a cache folder."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    snapshot = cache / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    state = source_weights(num_classes=1000)
    save_file(state, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    model, note = build_model(ModelParams(name="test_resnet", pretrained=True), 3)
    assert backbone_equal(model, state)
    assert "Hugging Face cache" in note
