"""Param overrides as ``key=value``, the way ``dvc exp run -S`` takes them, checked before use."""

from __future__ import annotations

from pathlib import Path

import yaml

from flows.core.errors import TunedeckError
from flows.core.params import parse_params


def parse_overrides(items: list[str]) -> dict[str, object]:
    """{'train.lr': 0.01, ...} from ['train.lr=0.01', ...]; values are read as YAML."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TunedeckError(f"override '{item}' is not key=value: write it like train.lr=0.0003.")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def apply_overrides(params_path: Path, items: list[str]) -> str:
    """Write the overrides into params.yaml (comments kept) after checking them; return the old text."""
    original = params_path.read_text()
    params_path.write_text(overridden_text(params_path, items))
    return original


def overridden_text(params_path: Path, items: list[str]) -> str:
    """params.yaml's text with the overrides in (comments kept), checked against the params schema."""
    from ruamel.yaml import YAML

    original = params_path.read_text()
    changes = parse_overrides(items)
    rt = YAML()
    data = rt.load(original)
    plain = yaml.safe_load(original)
    for key, value in changes.items():
        node, parts = data, key.split(".")
        target = plain
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                raise TunedeckError(f"override '{key}': '{part}' is not a params group in {params_path}.")
            node, target = node[part], target[part]
        node[parts[-1]] = value
        target[parts[-1]] = value
    parse_params(plain, source=f"{params_path} with overrides {' '.join(items)}")
    from io import StringIO

    buffer = StringIO()
    rt.dump(data, buffer)
    return buffer.getvalue()
