"""`tunedeck verify vX`: is a registered version still the model and the data its record names?

A version's record is its commit (the GTO tag `model@vX` points at it): `models/model.json` (a DVC output
of that commit, read from the cache: the model file's sha256 and the data version it was trained on, DVC's md5 of the data folder), `dvc.lock` (DVC's
md5 of the model file and of the data folder the prepare stage read) and `params.yaml`. Verify fetches
the model file as anyone would (`dvc artifacts get`: the DVC cache, else the remote), recomputes its
sha256 and md5 and holds them to the record; it holds the data version of the card to dvc.lock's, and,
where the data folder is in this clone's DVC cache, recomputes the md5 of its manifest and of each file.
Any mismatch is one sentence and exit 1.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from flows.contracts import ModelCard
from flows.core.errors import TunedeckError
from flows.core.model_file import file_digest, sha256
from flows.gateways.dvc.experiments import read_output
from flows.gateways.git import git
from flows.ship import registry

MODEL_PATH = "models/model.safetensors"


def md5_of(path: Path) -> str:
    return file_digest(path, "md5")


def _lock_md5(lock: dict, stage: str, kind: str, path: str) -> str | None:
    for entry in (lock.get("stages", {}).get(stage, {}) or {}).get(kind, []) or []:
        if entry.get("path") == path:
            return entry.get("md5")
    return None


def cache_object(cache: Path, md5: str) -> Path:
    """Where DVC 3 keeps the object of md5 (a `.dir` manifest keeps its suffix)."""
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def _data_checks(root: Path, source: str, md5: str) -> tuple[list[str], list[str]]:
    """The data folder's manifest and files, recomputed where this clone's DVC cache holds them (else the
    workspace's folder, when it is still that version)."""
    from flows.core.images import folder_version
    from flows.gateways.dvc.repo import resolved_config

    cache = Path(resolved_config(root)[0])
    manifest = cache_object(cache, md5)
    if not manifest.is_file():
        folder = root / source
        if folder.is_dir() and folder_version(folder) == md5:
            return [f"data {md5}: not in the DVC cache; the workspace's {source} re-hashed to it"], []
        return [f"data {md5}: neither in this clone's DVC cache nor in its workspace, so its files were not "
                "re-hashed (`dvc pull` to check them)"], []
    if md5_of(manifest) != md5.removesuffix(".dir"):
        return [], [f"the data folder's manifest {manifest} does not hash to {md5}: the DVC cache was altered; "
                    "fetch it again from the remote (`dvc pull --force`)"]
    entries = json.loads(manifest.read_text())
    changed, absent = [], 0
    for entry in entries:
        path = cache_object(cache, entry["md5"])
        if not path.is_file():
            absent += 1
        elif md5_of(path) != entry["md5"]:
            changed.append(entry["relpath"])
    if changed:
        return [], [f"{len(changed)} file{'s' if len(changed) > 1 else ''} of data {md5} in the DVC cache "
                    f"{'do' if len(changed) > 1 else 'does'} not hash to the manifest's md5 (the first: {changed[0]}): "
                    "fetch them again from the remote (`dvc pull --force`)"]
    note = f" ({absent} not in the cache)" if absent else ""
    return [f"data {md5}: the manifest and {len(entries) - absent} file{'s' if len(entries) - absent != 1 else ''} "
            f"re-hashed to their md5{note}"], []


def verify(root: Path, version: str) -> tuple[list[str], list[str]]:
    """(what was checked and held, the mismatches: one sentence each) for the registered version."""
    found = next((v for v in registry.versions(root) if v.version == version), None)
    if found is None:
        raise TunedeckError(f"there is no registered version {version}: `tunedeck registry` lists them.")
    try:
        card = ModelCard.model_validate_json(read_output(root, "models/model.json", found.commit))
        lock = yaml.safe_load(git("show", f"{found.commit}:dvc.lock", cwd=root)) or {}
        params = yaml.safe_load(git("show", f"{found.commit}:params.yaml", cwd=root)) or {}
    except (TunedeckError, ValueError) as exc:
        raise TunedeckError(f"{version}'s commit {found.commit[:12]} lacks a readable record (models/model.json, "
                            f"dvc.lock, params.yaml): {exc}") from None
    held, problems = [f"{version}: commit {found.commit[:12]}, trained on data {card.data_version}"], []
    with tempfile.TemporaryDirectory() as tmp:
        model = registry.fetch(root, Path(tmp) / "model.safetensors", version=version)
        digest, md5 = sha256(model), md5_of(model)
    recorded_md5 = _lock_md5(lock, "train", "outs", MODEL_PATH)
    if digest != card.sha256 or (recorded_md5 and md5 != recorded_md5):
        from flows.gateways.dvc.repo import resolved_config

        copy = cache_object(Path(resolved_config(root)[0]), recorded_md5 or md5)
        problems.append(f"{version}'s model file hashes to sha256 {digest[:16]}… (md5 {md5}), its record says "
                        f"{card.sha256[:16]}… (dvc.lock: md5 {recorded_md5}): the copy in this clone's DVC cache "
                        f"({copy}) or in its remote was altered; delete that copy and `dvc pull` from a trusted remote")
    else:
        held.append(f"model file: sha256 {digest[:16]}… as in its card, md5 {md5} as in dvc.lock")
    source = str((params.get("data") or {}).get("source", ""))
    data_md5 = _lock_md5(lock, "prepare", "deps", source)
    if data_md5 is None:
        problems.append(f"dvc.lock at {version}'s commit names no md5 for the data folder {source or '?'}: "
                        "the version was not made by `dvc repro`")
    elif data_md5 != card.data_version:
        problems.append(f"{version}'s model card says data {card.data_version}, dvc.lock at its commit says {data_md5}: "
                        "the model was not trained on the data its commit records")
    else:
        held.append(f"data folder {source}: md5 {data_md5} as in the model card")
        more, wrong = _data_checks(root, source, data_md5)
        held += more
        problems += wrong
    return held, problems
