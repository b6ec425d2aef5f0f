"""Build a timm backbone by name with a new head, and resolve its preprocessing."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from flows.core.errors import TunedeckError
from flows.core.params import ModelParams
from flows.core.weights import check_hub_weights, load_backbone


@dataclass(frozen=True)
class Preprocessing:
    """How images are normalised for this model (from its pretrained_cfg)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def check_model_name(name: str) -> None:
    """Raise TunedeckError, with close names, when timm has no model called ``name``."""
    import timm

    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(name):
        return
    base = name.split(".")[0]
    if timm.is_model(base):
        return
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise TunedeckError(
        f"model.name '{name}' is not a timm model: {hint}"
        f"`python -c \"import timm; print(timm.list_models('*{base[:6]}*'))\"` lists the names."
    )


def build_model(cfg: ModelParams, num_classes: int) -> tuple[nn.Module, str]:
    """The backbone with a head for num_classes, and one line saying where its weights came from."""
    import timm

    check_model_name(cfg.name)
    if cfg.pretrained is True:
        check_hub_weights(cfg.name)
        model = timm.create_model(cfg.name, pretrained=True, num_classes=num_classes, drop_rate=cfg.drop_rate)
        return model, f"pretrained weights of {cfg.name} from the Hugging Face cache"
    model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, drop_rate=cfg.drop_rate)
    if cfg.pretrained is False:
        return model, "random initialisation (model.pretrained is false)"
    loaded = load_backbone(model, Path(cfg.pretrained), cfg.name)
    return model, f"{loaded} tensors from {cfg.pretrained}, new head for {num_classes} classes"


def preprocessing(model: nn.Module) -> Preprocessing:
    """Mean, std and interpolation from the model's pretrained_cfg, as timm resolves them."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return Preprocessing(tuple(cfg["mean"]), tuple(cfg["std"]), str(cfg["interpolation"]))
