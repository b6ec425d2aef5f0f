"""Starting weights for a backbone: timm's pretrained tag via the Hugging Face cache, or a file.

Never falls back to random weights: when the weights asked for cannot be had, it says so.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch import nn

from flows.core.errors import TunedeckError

HUB_HOST = ("huggingface.co", 443)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within timeout seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def hub_weights_cached(name: str) -> tuple[str | None, bool]:
    """(hub id, cached?) for the default pretrained tag of timm model ``name``."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None, False
    for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return hub_id, True
    return hub_id, False


def check_hub_weights(name: str) -> None:
    """Fail fast, in seconds, when model ``name``'s pretrained weights are neither cached nor reachable."""
    hub_id, cached = hub_weights_cached(name)
    if hub_id is None:
        raise TunedeckError(
            f"model.name '{name}' has no pretrained weights on the Hugging Face Hub that timm knows of: "
            "set model.pretrained to a weights file, or to false to train from scratch."
        )
    if not cached and not hub_reachable():
        raise TunedeckError(
            f"the pretrained weights of '{name}' ({hub_id}) are not in the Hugging Face cache and "
            "huggingface.co cannot be reached: download them once on a connected machine (or copy "
            "~/.cache/huggingface over), or set model.pretrained to a local .safetensors file, or to false."
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or .pth/.pt/.bin with the weights-only unpickler."""
    if not path.is_file():
        raise TunedeckError(f"model.pretrained '{path}' does not exist: point it at a .safetensors or .pth file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise TunedeckError(f"model.pretrained '{path}' could not be read ({type(exc).__name__}): is it a weights file?") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TunedeckError(f"model.pretrained '{path}' holds no state dict of tensors: save one with model.state_dict().")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone(model: nn.Module, path: Path, model_name: str) -> int:
    """Load a weights file into model, keeping its new head when the shapes differ.

    Returns the number of tensors loaded. Raises TunedeckError when any backbone tensor is
    missing or has another shape: such weights belong to another architecture.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = _head_prefix(model)
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    bad = [k for k in mismatched + missing if not k.startswith(head)]
    if bad:
        raise TunedeckError(
            f"model.pretrained '{path}' does not fit model.name '{model_name}': {len(bad)} backbone "
            f"tensors are missing or have another shape (first: {bad[0]}); use weights saved from {model_name}."
        )
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    model.load_state_dict(usable, strict=False)
    return len(usable)


def _head_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the classifier timm would replace (e.g. 'fc.' or 'head.fc.')."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") or "fc"
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0]
    return f"{classifier}."
