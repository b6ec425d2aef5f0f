"""Training on the real config shrunk to a tiny timm test model on CPU."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file

from flows.core.augment import Normalizer, crop_and_flip
from flows.core.evaluate import evaluate
from flows.core.model import build_model, preprocessing
from flows.core.prepare import prepare
from flows.core.train import train


def test_a_training_step_lowers_the_loss_and_reaches_every_parameter(tiny_params):
    torch.manual_seed(0)
    model, _ = build_model(tiny_params.model, 3)
    prep = preprocessing(model)
    norm = Normalizer(prep.mean, prep.std, torch.device("cpu"))
    x = torch.randint(0, 255, (8, 16, 16, 3), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for step in range(5):
        loss = torch.nn.functional.cross_entropy(model(norm(x)), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        if step == 4:  # timm zero-inits each block's last BN, so deep grads are zero until it moves
            missing = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum()]
            assert not missing, f"no gradient reached {missing}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(np.isfinite(losses))


def test_hflip_flips_width_only(tiny_params):
    x = torch.arange(2 * 2 * 3 * 3, dtype=torch.uint8).view(2, 2, 3, 3)
    always = tiny_params.train.model_copy(update={"hflip": 1.0})
    never = tiny_params.train.model_copy(update={"hflip": 0.0})
    assert torch.equal(crop_and_flip(x, always, torch.Generator().manual_seed(0)), x.flip(2))
    assert torch.equal(crop_and_flip(x, never, torch.Generator()), x)


def test_crop_padding_keeps_the_shape_and_moves_pixels(tiny_params):
    x = torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8)
    cfg = tiny_params.train.model_copy(update={"hflip": 0.0, "crop_padding": 2})
    out = crop_and_flip(x, cfg, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)


def test_train_and_evaluate_write_model_metrics_and_plots(tiny_params, tmp_path):
    prepared, models, out = tmp_path / "prepared", tmp_path / "models", tmp_path / "eval"
    prepare(tiny_params, prepared)
    seen = []

    class Recorder:
        def start(self, resumed, first_epoch=0):
            assert not resumed and first_epoch == 0

        def log(self, epoch, metrics):
            seen.append((epoch, metrics))

    result = train(tiny_params, prepared, models, Recorder())
    assert [e for e, _ in seen] == [0, 1]
    assert {"train/loss", "val/acc", "lr/group0", "samples_per_s", "step_ms", "peak_mem_mb"} <= set(seen[0][1])
    config = json.loads((models / "model.json").read_text())
    assert config["classes"] == ["cat", "dog", "fox"] and config["sha256"] == result.model_sha256
    assert set(load_file(str(models / "model.safetensors"))) == set(build_model(tiny_params.model, 3)[0].state_dict())
    metrics = evaluate(tiny_params, prepared, models, out)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_test"] > 0
    confusion = json.loads((out / "confusion.json").read_text())
    assert len(confusion) == metrics["n_test"] and {"actual", "predicted"} == set(confusion[0])
    assert set(json.loads((out / "per_class.json").read_text())) == {"cat", "dog", "fox"}


def test_training_is_deterministic_on_cpu(tiny_params, tmp_path):
    prepare(tiny_params, tmp_path / "p")
    a = train(tiny_params, tmp_path / "p", tmp_path / "a")
    b = train(tiny_params, tmp_path / "p", tmp_path / "b")
    assert a.model_sha256 == b.model_sha256


def test_training_without_a_validation_split_keeps_the_lowest_loss(tiny_params, tmp_path):
    params = tiny_params.model_copy(update={"data": tiny_params.data.model_copy(update={"val_fraction": 0.0})})
    prepare(params, tmp_path / "p")
    result = train(params, tmp_path / "p", tmp_path / "m")
    assert result.val_accuracy is None and (tmp_path / "m" / "model.safetensors").is_file()
