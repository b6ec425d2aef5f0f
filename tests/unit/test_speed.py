"""The precision train.precision: auto picks on the CPU, and the random-resized crops on tensors."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

from flows.contracts.settings import Settings
from flows.core import speed
from flows.core.augment import crop_and_flip, crop_boxes, resized_crops
from flows.core.errors import TunedeckError
from flows.core.images import decode_image
from flows.core.model import build_model
from flows.core.params import parse_params
from flows.core.prepare import load_split, prepare
from flows.core.speed import autocast, cpu_bf16, resolve_precision
from flows.core.train import train
from tests.conftest import ROOT, tiny_params_dict

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags", [{"avx512f", "avx512_bf16"}, {"amx_tile", "amx_bf16"}])
def test_auto_picks_bf16_on_a_cpu_with_native_bf16(monkeypatch, flags):
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset(flags))
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype is torch.bfloat16 and chosen.name == "bf16" and "bf16" in chosen.reason


@pytest.mark.parametrize("flags", [{"avx2", "avx512f", "avx512bw"}, set()])
def test_auto_picks_fp32_on_a_cpu_without_native_bf16(monkeypatch, flags):
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset(flags))
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype is None and chosen.name == "fp32" and chosen.reason.startswith("auto: ")


def test_the_setting_overrides_the_flags(monkeypatch):
    monkeypatch.setattr(speed, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    forced = Settings.read({"TUNEDECK_CPU_BF16": "0"}).cpu_bf16
    assert resolve_precision("auto", CPU, forced).dtype is None
    monkeypatch.setattr(speed, "cpu_flags", frozenset)
    assert resolve_precision("auto", CPU, Settings.read({"TUNEDECK_CPU_BF16": "1"}).cpu_bf16).dtype is torch.bfloat16


def test_explicit_precisions_are_kept_and_fp16_is_refused_on_the_cpu():
    assert resolve_precision("fp32", CPU).name == "fp32"
    assert resolve_precision("bf16", CPU).name == "bf16"
    with pytest.raises(TunedeckError, match="fp16"):
        resolve_precision("fp16", CPU)


def test_bf16_steps_give_a_finite_loss_close_to_fp32s(tiny_params):
    """bf16 autocast against fp32 from the same weights and batches: finite, within a few percent, step by step.

    bf16 runs on any CPU (emulated where it has no native bf16, only slower), so this holds everywhere;
    `auto` picks it only where the CPU has it natively."""
    assert resolve_precision("auto", CPU).dtype is (torch.bfloat16 if cpu_bf16()[0] else None)
    losses = {}
    for dtype in (torch.bfloat16, None):
        torch.manual_seed(0)
        model, _ = build_model(tiny_params.model, 3)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        losses[dtype] = []
        for _ in range(4):
            with autocast(CPU, dtype):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[dtype].append(loss.item())
    assert np.isfinite(losses[torch.bfloat16]).all()
    np.testing.assert_allclose(losses[torch.bfloat16], losses[None], rtol=0.05, atol=0.02)


def test_the_run_records_its_precision_and_why(tiny_params, tmp_path, monkeypatch):
    tiny_params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"precision": "auto"})})
    described = {}

    class Recorder:
        def start(self, resumed, first_epoch=0):
            pass

        def describe(self, facts):
            described.update(facts)

        def log(self, epoch, metrics):
            pass

    params = tiny_params.model_copy(update={"train": tiny_params.train.model_copy(update={"epochs": 1})})
    prepare(params, tmp_path / "p")
    result = train(params, tmp_path / "p", tmp_path / "m", Recorder(), cpu_bf16=False)  # a CPU without native bf16
    assert (result.precision, described["precision"]) == ("fp32", "fp32")
    assert described["precision_reason"] == result.precision_reason == "auto: TUNEDECK_CPU_BF16=0"


def test_crop_boxes_lie_inside_the_image_within_the_scale_and_ratio():
    boxes = crop_boxes(2000, 48, 64, (0.08, 1.0), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 64).all() and (boxes[:, 3] <= 48).all()
    area = w * h / (48 * 64)
    assert area.min() >= 0.07 and area.max() <= 1.0
    assert ((w / h) > 0.7).all() and ((w / h) < 1.45).all()


def test_resized_crops_resize_each_image_to_the_size_and_a_whole_box_changes_nothing():
    x = torch.randint(0, 255, (4, 24, 24, 3), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = resized_crops(x, 16, (0.08, 1.0), gen)
    assert out.shape == (4, 16, 16, 3) and out.dtype == torch.uint8
    assert torch.equal(resized_crops(x, 24, (1.0, 1.0), gen), x)


def test_crop_and_flip_takes_stored_images_down_to_the_training_size(tiny_params):
    x = torch.randint(0, 255, (4, 24, 24, 3), dtype=torch.uint8)
    rrc = tiny_params.train.model_copy(update={"crop_scale": (0.08, 1.0)})
    assert crop_and_flip(x, rrc, torch.Generator().manual_seed(0), 16).shape == (4, 16, 16, 3)
    assert crop_and_flip(x, tiny_params.train, torch.Generator(), 16).shape == (4, 16, 16, 3)


def test_prepare_stores_train_at_store_size_and_val_test_as_predict_decodes(image_folder, tmp_path):
    raw = tiny_params_dict(str(image_folder))
    raw["data"]["store_size"] = 24
    raw["train"].update(crop_scale=[0.08, 1.0], epochs=1)
    params = parse_params(raw)
    prepare(params, tmp_path / "p")
    train_x, _ = load_split(tmp_path / "p", "train")
    test_x, test_y = load_split(tmp_path / "p", "test")
    assert train_x.shape[1:] == (24, 24, 3) and test_x.shape[1:] == (16, 16, 3)
    files = sorted(p for p in image_folder.rglob("*.png"))
    decoded = {decode_image(p, 16).tobytes() for p in files}
    assert all(img.tobytes() in decoded for img in test_x) and len(test_y) == len(test_x)
    result = train(params, tmp_path / "p", tmp_path / "m")
    assert result.epochs_run == 1


@pytest.mark.parametrize(("change", "words"), [
    ({"data": {"image_size": 32, "store_size": 24}}, "store_size"),
    ({"train": {"crop_scale": [0.08, 1.0], "crop_padding": 4}}, "crop_padding"),
    ({"train": {"crop_scale": [0.5, 0.2]}}, "crop_scale"),
])
def test_bad_crop_settings_are_one_sentence(image_folder, change, words):
    raw = tiny_params_dict(str(image_folder))
    for group, values in change.items():
        raw[group].update(values)
    with pytest.raises(TunedeckError, match=words):
        parse_params(raw)


def test_a_non_finite_loss_stops_the_run_with_one_sentence(tiny_params, tmp_path, monkeypatch):
    from flows.core.trainer import Trainer

    monkeypatch.setattr(Trainer, "_accumulate", lambda self, x, target: float("nan"))
    prepare(tiny_params, tmp_path / "p")
    with pytest.raises(TunedeckError, match="training loss became nan at step 0 in fp32.*train.precision: fp32"):
        train(tiny_params, tmp_path / "p", tmp_path / "m")


def test_small_maps_run_in_nchw_and_compute_the_same():
    """The convolutions with a map of at most 4x4 get NCHW weights and inputs; the outputs and gradients do not change."""
    import timm

    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=3).to(memory_format=torch.channels_last)
    mixed = timm.create_model("test_resnet", num_classes=3).to(memory_format=torch.channels_last)
    mixed.load_state_dict(plain.state_dict())
    moved = speed.nchw_for_small_maps(mixed, 64)
    convs = [m for m in mixed.modules() if isinstance(m, torch.nn.Conv2d)]
    nchw = [c for c in convs if c.weight.dim() == 4 and c.weight.shape[1] * c.weight.shape[2] > 1 and c.weight.is_contiguous()
            and not c.weight.is_contiguous(memory_format=torch.channels_last)]
    assert 0 < moved < len(convs) and len(nchw) > 0
    assert speed.nchw_for_small_maps(timm.create_model("test_resnet").to(memory_format=torch.channels_last), 224) == 0

    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for model in (plain, mixed):
        model.train()
        model(x).square().mean().backward()
    assert torch.allclose(plain(x), mixed(x), atol=1e-5)
    for (name, a), b in zip(plain.named_parameters(), mixed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_a_model_the_probe_cannot_run_keeps_channels_last():
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            raise ValueError("wants a dict")

    model = Odd().to(memory_format=torch.channels_last)
    assert speed.nchw_for_small_maps(model, 8) == 0
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last) and model.training  # its mode restored


FAULTS = """
import json, resource, sys, timm, torch
from flows.core.speed import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.manual_seed(0)
model = timm.create_model("resnet18", num_classes=3)
x = torch.randn(16, 3, 64, 64)
def step():
    model(x).square().mean().backward()
for _ in range(3):
    step()
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def test_a_training_process_keeps_freed_memory_instead_of_faulting_it_back_in():
    """With glibc's defaults each training step faults its activations' pages back in (zeroed); retained, they stay.

    Compared with the default in the same run, on the same machine, step by step: the counts depend on
    the kernel and the allocator (retained: 0 on one EPYC, 51 on another; default: 690 to 13,600).
    glibc's default moves its mmap threshold up as big blocks are freed, so left alone it stopped
    faulting after a while in some runs and not others (a step's mean fell to 1,171 in one CI run,
    0 in one quiet run): both processes start from its documented default, pinned
    (MALLOC_MMAP_THRESHOLD_=131072), and the median step is compared, so a one-off fault (a new
    thread's arena) is not taken for the steady state. Where the C library is not glibc nothing is
    retained, and `retain_freed_memory` says so."""
    if platform.libc_ver()[0] != "glibc":
        assert speed.retain_freed_memory() is False
        return
    pinned = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    steps = {mode: json.loads(subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                                             check=True, env=pinned).stdout.split("\n")[-2]) for mode in ("default", "retain")}
    faults = {mode: statistics.median(counts) for mode, counts in steps.items()}
    print(f"page faults a step (median of 9): {faults}; each step: {steps}")
    assert faults["retain"] * 10 < faults["default"], f"page faults a step (median of 9): {faults}; each step: {steps}"
