"""Each fine-tuning control, on CPU with a tiny timm test model."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

import flows.core.trainer as trainer_module
from flows.core.distributed import World
from flows.core.errors import TunedeckError
from flows.core.params import parse_params
from flows.core.prepare import load_manifest, prepare
from flows.core.speed import autocast_dtype, maybe_compile
from flows.core.train import train
from flows.core.trainer import Trainer
from flows.core.transfer import Freezer
from tests.conftest import tiny_params_dict


def make(tmp_path, image_folder, **train):
    raw = tiny_params_dict(str(image_folder))
    raw["train"].update(train)
    params = parse_params(raw)
    prepared = tmp_path / "prepared"
    if not prepared.exists():
        prepare(params, prepared)
    return params, prepared


def trainer(params, prepared):
    return Trainer(params, load_manifest(prepared), prepared, torch.device("cpu"), World(), None)


def snapshot(module, names):
    state = module.state_dict()
    return {n: state[n].clone() for n in names}


def test_frozen_backbone_does_not_move_then_unfreezes(tmp_path, image_folder):
    params, prepared = make(tmp_path, image_folder, epochs=3, freeze_epochs=2)
    t = trainer(params, prepared)
    backbone = [n for n in t.model.state_dict() if not n.startswith("fc.")]  # BN running stats included
    before = snapshot(t.model, backbone)
    head_before = t.model.fc.weight.detach().clone()
    for epoch in range(2):
        t._epoch(epoch, 0, None, None, "")
    after = snapshot(t.model, backbone)
    assert all(torch.equal(before[n], after[n]) for n in backbone), "frozen weights or BN stats moved"
    assert not torch.equal(head_before, t.model.fc.weight), "the head must train during the probe"
    t._epoch(2, 0, None, None, "")
    assert any(not torch.equal(after[n], t.model.state_dict()[n]) for n in backbone)


def test_gradual_unfreezing_thaws_one_block_per_epoch_from_the_top(tmp_path, image_folder):
    params, prepared = make(tmp_path, image_folder, epochs=6, freeze_epochs=1, unfreeze="gradual")
    t = trainer(params, prepared)
    freezer = Freezer(t.model, params.train)
    sizes = [len(freezer.frozen_at(e)) for e in range(6)]
    assert sizes[0] > sizes[1] > sizes[2] > 0 and sizes == sorted(sizes, reverse=True)
    assert not any(n.startswith("layer4") for n in freezer.frozen_at(1)), "the top block thaws first"
    assert any(n.startswith("layer3") for n in freezer.frozen_at(1))


def test_layer_decay_and_head_lr_give_the_expected_group_lrs(tmp_path, image_folder):
    params, prepared = make(tmp_path, image_folder, layer_decay=0.5, head_lr_scale=10.0, scheduler="none")
    t = trainer(params, prepared)
    lr = params.train.lr
    by_scale = {}
    for group in t.optimizer.param_groups:
        by_scale.setdefault(round(group["lr_scale"], 6), []).append(group)
    head = [g for g in t.optimizer.param_groups if g["is_head"]]
    assert head and all(g["lr_scale"] == pytest.approx(10.0) for g in head)
    backbone_scales = sorted({round(g["lr_scale"], 6) for g in t.optimizer.param_groups if not g["is_head"]})
    # test_resnet: stem + 4 stages + head = 6 layer ids, so scales are 0.5^5 .. 0.5^1
    assert backbone_scales == [pytest.approx(0.5**k) for k in (5, 4, 3, 2, 1)]
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(t.optimizer, sched="cosine", num_epochs=4)
    scheduler.step(0)
    for group in t.optimizer.param_groups:
        assert group["lr"] == pytest.approx(lr * group["lr_scale"])


def test_ema_differs_from_the_raw_weights_and_is_saved(tmp_path, image_folder):
    params, prepared = make(tmp_path, image_folder, epochs=2, ema_decay=0.9)
    result = train(params, prepared, tmp_path / "models", checkpoints=tmp_path / "ckpt")
    state = torch.load(next((tmp_path / "ckpt").glob("*/last.pt")), weights_only=False)
    raw, ema = state["model"], state["ema"]
    assert any(not torch.equal(raw[k], ema["module." + k] if "module." + k in ema else ema[k]) for k in raw if raw[k].is_floating_point())
    config = json.loads((tmp_path / "models" / "model.json").read_text())
    assert config["weights"] in ("raw", "ema") and result.model_sha256 == config["sha256"]


def test_early_stopping_stops(tmp_path, image_folder):
    params, prepared = make(tmp_path, image_folder, epochs=20, early_stopping=2, lr=1e-9, scheduler="none")
    result = train(params, prepared, tmp_path / "models")
    assert result.epochs_run == 3, "best at epoch 1, then 2 epochs without improvement"


def test_an_injected_oom_halves_the_micro_batch_and_keeps_the_effective_batch(tmp_path, image_folder, monkeypatch, caplog):
    params, prepared = make(tmp_path, image_folder, epochs=1, batch_size=8, accum_steps=1)
    real_build = trainer_module.build_model

    def build_with_small_memory(cfg, n):
        model, note = real_build(cfg, n)
        forward = model.forward

        def limited(x):
            if model.training and len(x) > 4:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return forward(x)

        model.forward = limited
        return model, note

    monkeypatch.setattr(trainer_module, "build_model", build_with_small_memory)
    with caplog.at_level(logging.WARNING, logger="tunedeck"):
        result = train(params, prepared, tmp_path / "models")
    config = json.loads((tmp_path / "models" / "model.json").read_text())
    assert result.oom_events == 1
    assert (config["micro_batch"], config["accum_steps"]) == (4, 2)
    assert config["micro_batch"] * config["accum_steps"] == 8
    assert "micro-batch halved to 4" in caplog.text


def test_checkpoints_resume_to_bit_identical_weights(tmp_path, image_folder):
    params, prepared = make(tmp_path, image_folder, epochs=3, checkpoint_every=2, ema_decay=0.9, crop_padding=2, hflip=0.5)
    whole = train(params, prepared, tmp_path / "a", checkpoints=tmp_path / "ca")
    # a run stopped after its first epoch's mid-epoch checkpoint ...
    short = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 3})})
    from flows.core.train import run_folder, run_key

    t = trainer(short, prepared)
    key = run_key(short, load_manifest(prepared))
    t._epoch(0, 0, None, run_folder(tmp_path / "cb", key), key)
    # ... and resumed by a fresh process-like Trainer
    resumed = train(params, prepared, tmp_path / "b", checkpoints=tmp_path / "cb")
    assert resumed.resumed_at is not None and resumed.resumed_at.startswith("epoch 1, batch")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.model_sha256 == resumed.model_sha256


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, image_folder, caplog):
    params, prepared = make(tmp_path, image_folder, epochs=2)
    train(params, prepared, tmp_path / "m", checkpoints=tmp_path / "c")
    next((tmp_path / "c").glob("*/last.pt")).write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="tunedeck"):
        result = train(params, prepared, tmp_path / "m", checkpoints=tmp_path / "c")
    assert "unreadable" in caplog.text and result.resumed_at == "epoch 2, batch 0"


def test_other_params_do_not_resume(tmp_path, image_folder):
    params, prepared = make(tmp_path, image_folder, epochs=1)
    train(params, prepared, tmp_path / "m", checkpoints=tmp_path / "c")
    first = {p.parent.name: p.read_bytes() for p in (tmp_path / "c").glob("*/last.pt")}
    other, _ = make(tmp_path, image_folder, epochs=1, lr=0.01)
    assert train(other, prepared, tmp_path / "m", checkpoints=tmp_path / "c").resumed_at is None
    folders = {p.parent.name: p.read_bytes() for p in (tmp_path / "c").glob("*/last.pt")}
    assert len(folders) == 2 and all(folders[k] == v for k, v in first.items()), "another run's checkpoints stay as they were"


def test_augmentations_train(tmp_path, image_folder):
    params, prepared = make(
        tmp_path, image_folder, epochs=1, batch_size=6, mixup=0.2, cutmix=1.0, random_erasing=0.5,
        auto_augment="rand-m9-mstd0.5", label_smoothing=0.1, clip_grad=1.0, accum_steps=2,
    )
    result = train(params, prepared, tmp_path / "models")
    assert result.epochs_run == 1 and (tmp_path / "models" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"accum_steps": 0}, "train.accum_steps must be greater than or equal to 1"),
        ({"batch_size": 0}, "train.batch_size must be greater than or equal to 1"),
        ({"freeze_epochs": 5, "epochs": 3}, "train.freeze_epochs (5) must not exceed train.epochs (3)"),
        ({"optimizer": "adamww"}, "train.optimizer must be"),
        ({"scheduler": "cosin"}, "train.scheduler must be"),
        ({"auto_augment": "randaug"}, "is not a timm policy"),
        ({"warmup_epochs": 5, "epochs": 5}, "train.warmup_epochs (5) must be below train.epochs (5)"),
    ],
)
def test_bad_train_params(change, message):
    raw = tiny_params_dict("x")
    raw["train"].update(change)
    with pytest.raises(TunedeckError) as err:
        parse_params(raw)
    assert message in str(err.value)


def test_precision_refusals(monkeypatch):
    with pytest.raises(TunedeckError, match="fp16 needs a CUDA or MPS device"):
        autocast_dtype("fp16", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(TunedeckError, match="bf16 is not supported by Tesla T4"):
        autocast_dtype("bf16", torch.device("cuda", 0))
    # a CPU without native bf16 (tests/unit/test_speed.py: one with it)
    assert autocast_dtype("auto", torch.device("cpu"), cpu_bf16_forced=False) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


def test_compile_unsupported_falls_back_with_a_warning(monkeypatch, caplog):
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING, logger="tunedeck"):
        assert maybe_compile(model, True) is model
    assert "runs eagerly" in caplog.text


def test_auto_device_picks_the_gpu_with_most_free_memory(monkeypatch):
    import flows.core.devices as devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(devices, "free_memory", lambda i: [2, 9, 5][i] * 2**30)
    assert devices.resolve_device("auto") == torch.device("cuda", 1)
    with pytest.raises(TunedeckError, match="only 3 CUDA GPU"):
        devices.resolve_device("cuda:5")
