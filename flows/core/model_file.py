"""A trained model as one self-describing file: its weights in .safetensors, and in the file's
metadata what it takes to rebuild and feed it (flows.contracts.ModelMeta: timm name, classes,
input size, normalisation, temperature). A file from the registry (`dvc artifacts get`) is
enough to predict with; no model.json has to travel beside it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flows.contracts import ModelMeta
from flows.core.errors import TunedeckError

META_KEY = "tunedeck.model"


def save_model(path: Path, state: dict, meta: ModelMeta) -> None:
    """Write the state dict with meta in the file's header."""
    from safetensors.torch import save_file

    save_file(state, str(path), metadata={META_KEY: meta.model_dump_json()})


def read_meta(path: Path) -> ModelMeta:
    """The ModelMeta in a model file's header; one sentence when it is missing or not tunedeck's."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TunedeckError(f"model file {path} not found: give a .safetensors file the train stage wrote, or prod / vX.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(META_KEY)
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise TunedeckError(f"{path} is not a readable .safetensors file ({exc}): give a model the train stage wrote.") from None
    if raw is None:
        raise TunedeckError(f"{path} has no tunedeck metadata: it was not written by the train stage; retrain it (`dvc repro train`).")
    return ModelMeta.model_validate_json(raw)


def load_model(path: Path, device="cpu"):
    """(the timm model in eval mode on device, its ModelMeta) from one model file."""
    import timm
    from safetensors.torch import load_file

    meta = read_meta(path)
    model = timm.create_model(meta.model_name, pretrained=False, num_classes=len(meta.classes))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval(), meta


def sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks."""
    return file_digest(path, "sha256")


def file_digest(path: Path, algorithm: str) -> str:
    """The file's hex digest by hashlib's algorithm (sha256, md5 ...), read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
