"""Devices beyond CUDA (flows.core.devices, speed, gateways.power): Intel GPUs as torch's xpu, AMD GPUs as a ROCm
build's cuda. No such device is here: torch's own queries are stood in for, the rules around them are ours."""

from __future__ import annotations

import pytest
import torch

from flows.core.devices import gpu_kind, resolve_device
from flows.core.errors import TunedeckError
from flows.core.params import parse_params
from flows.core.speed import resolve_precision
from flows.gateways.power import device_name
from tests.conftest import tiny_params_dict


@pytest.fixture
def two_intel_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 2)
    monkeypatch.setattr(torch.xpu, "get_device_name", lambda device=None: "Intel(R) Data Center GPU Max 1550")


def test_xpu_is_a_device_params_accept_and_auto_picks_it_after_cuda(two_intel_gpus):
    raw = tiny_params_dict("data/x")
    raw["base"]["device"] = "xpu:1"
    assert parse_params(raw).base.device == "xpu:1"
    assert resolve_device("xpu:1") == torch.device("xpu", 1) and resolve_device("auto") == torch.device("xpu", 0)
    with pytest.raises(TunedeckError, match="only 2 Intel GPU"):
        resolve_device("xpu:2")
    precision = resolve_precision("auto", torch.device("xpu", 0))
    assert precision.name == "bf16" and "Max 1550" in precision.reason
    assert device_name(["xpu:0"]) == "xpu: Intel(R) Data Center GPU Max 1550"
    assert device_name(["xpu:0", "xpu:1"]) == "xpu: 2 x Intel(R) Data Center GPU Max 1550"


def test_no_intel_gpu_is_one_sentence_and_a_bad_device_name_is_refused(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    with pytest.raises(TunedeckError, match="no Intel GPU"):
        resolve_device("xpu")
    raw = tiny_params_dict("data/x")
    raw["base"]["device"] = "xpu:x"
    with pytest.raises(TunedeckError, match="xpu:N"):
        parse_params(raw)


def test_a_rocm_build_records_its_gpus_as_rocm(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.41133", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI300X")
    assert gpu_kind() == "rocm" and device_name(["cuda:0"]) == "rocm: AMD Instinct MI300X"
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert gpu_kind() == "cuda" and device_name(["cuda:0"]) == "cuda: AMD Instinct MI300X"
