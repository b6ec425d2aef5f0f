"""Where federated weights travel: one safetensors file per silo per round, in a folder or fsspec URL.

A silo's flow-run result lives on the silo's host; Prefect hands it to another host only through
a result store both reach. The exchange is that store made explicit and small: a folder (one
host, or a shared mount) or any fsspec URL (ssh://, s3://, as the DVC remotes). Silos write
their weights and example count there; the coordinator reads them once the silo's flow run is
Completed. A file holds a state dict and a few header fields, never images or features.
"""

from __future__ import annotations

import json
import uuid

import torch

HEADER = "tunedeck.federated"


def _fs(url: str):
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def _write(url: str, data: bytes) -> None:
    """data to url atomically: a temporary name in the same folder, then a rename."""
    fs, path = _fs(url)
    folder = path.rsplit("/", 1)[0]
    fs.makedirs(folder, exist_ok=True)
    temp = f"{folder}/.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(temp, data)
    fs.mv(temp, path)


def put_state(url: str, state: dict[str, torch.Tensor], header: dict) -> None:
    """Write the state dict with header to url atomically (a temporary name, then a rename)."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in state.items()}, metadata={HEADER: json.dumps(header)})
    _write(url, data)


def get_state(url: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, header) of a file written by put_state."""
    from safetensors.torch import load

    fs, path = _fs(url)
    data = fs.cat_file(path)
    size = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, then the JSON header
    meta = json.loads(data[8:8 + size]).get("__metadata__") or {}
    return load(data), json.loads(meta.get(HEADER, "{}"))


def exists(url: str) -> bool:
    """Whether url names a file."""
    fs, path = _fs(url)
    return fs.isfile(path)


def put_blob(url: str, array, header: dict) -> None:
    """Write a numpy array (a masked update) with a JSON header to url atomically: 8 bytes of header length, the
    header, the array's bytes."""
    head = json.dumps({**header, "dtype": str(array.dtype), "shape": list(array.shape)}).encode()
    _write(url, len(head).to_bytes(8, "little") + head + array.tobytes())


def get_blob(url: str):
    """(array, header) of a file written by put_blob."""
    import numpy as np

    fs, path = _fs(url)
    data = fs.cat_file(path)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    array = np.frombuffer(data[8 + size:], dtype=header.pop("dtype")).reshape(header.pop("shape"))
    return array, header


def put_json(url: str, value: dict) -> None:
    """A small JSON file (a silo's setup answer and public key), atomically."""
    _write(url, json.dumps(value).encode())


def get_json(url: str) -> dict:
    fs, path = _fs(url)
    return json.loads(fs.cat_file(path))
