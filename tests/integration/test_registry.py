"""The model registry in a real git + DVC project with a local DVC remote: the promotion gate,
rejection with its reason and no tag, `dvc artifacts get --stage prod`, and rollback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tests.integration.project import make_project, run

pytestmark = pytest.mark.slow


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tags(project: Path) -> set[str]:
    return set(run(project, "git", "tag", "--list").stdout.split())


def prod_file_sha(project: Path, tmp_path: Path) -> str:
    """sha256 of what DVC itself hands out as the prod model."""
    out = tmp_path / "prod.safetensors"
    run(project, "dvc", "artifacts", "get", ".", "model", "--stage", "prod", "-o", str(out), "--force")
    return sha256(out)


def set_params(project: Path, **groups: dict) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    for group, values in groups.items():
        raw.setdefault(group, {}).update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def zero_the_head(project: Path) -> None:
    """Make the trained model predict one class for every image: a candidate certainly worse than any trained prod."""
    script = (
        "from pathlib import Path\n"
        "from safetensors.torch import load_file\n"
        "from flows.contracts import ModelCard\n"
        "from flows.core.model_file import read_meta, save_model, sha256\n"
        "p = Path('models/model.safetensors'); meta = read_meta(p); state = load_file(str(p))\n"
        "state = {k: v * 0 if k.startswith('fc.') else v for k, v in state.items()}\n"
        "save_model(p, state, meta)\n"
        "card = ModelCard.read(Path('models')); card.model_copy(update={'sha256': sha256(p)}).write(Path('models'))\n"
    )
    run(project, "python", "-c", script)


def test_promote_reject_promote_within_tolerance_and_roll_back(tmp_path):
    project = make_project(tmp_path / "clone")  # its DVC remote is a local folder (.dvc/config)
    set_params(project, train={"epochs": 4, "lr": 0.01})
    run(project, "git", "commit", "-qam", "train longer")
    run(project, "dvc", "repro", "evaluate")
    first = sha256(project / "models" / "model.safetensors")

    # 1. the first model: no prod yet, so it is promoted
    run(project, "tunedeck", "promote")
    assert {"model@v0.1.0", "model#prod#1"} <= tags(project)
    assert prod_file_sha(project, tmp_path) == first
    card = (project / "MODEL_CARD.md").read_text()
    assert card.startswith("---\n") and "model-index:" in card and "v0.1.0" in card and "ECE" in card

    # 2. a candidate worse than prod beyond the tolerance: rejected, no new tag, the reason written down
    before = tags(project)
    zero_the_head(project)
    rejected = run(project, "tunedeck", "promote", check=False)
    assert rejected.returncode == 1, rejected.stderr
    assert tags(project) == before
    verdict = json.loads((project / "promotion.json").read_text())
    assert verdict["promoted"] is False and verdict["prod_version"] == "v0.1.0"
    assert any("below prod's" in r or "recall drops" in r for r in verdict["reasons"]), verdict
    assert verdict["prod"]["accuracy"] > verdict["candidate"]["accuracy"]
    assert rejected.stdout.count("rejected:") == 1, rejected.stdout  # the verdict once (it was printed twice)

    # 3. a candidate within the tolerance: promoted, and DVC hands out exactly its file as prod
    set_params(project, base={"seed": 7}, promote={"tolerance": 1.0, "max_class_drop": 1.0})
    run(project, "dvc", "repro", "evaluate")
    second = sha256(project / "models" / "model.safetensors")
    run(project, "tunedeck", "promote")
    assert {"model@v0.2.0", "model#prod#2"} <= tags(project)
    assert prod_file_sha(project, tmp_path) == second != first

    # 4. rollback: the earlier version is prod again, and no tag is ever deleted
    run(project, "tunedeck", "rollback", "--to", "v0.1.0")
    assert prod_file_sha(project, tmp_path) == first
    assert {"model@v0.1.0", "model@v0.2.0", "model#prod#1", "model#prod#2", "model#prod#3"} <= tags(project)
    shown = run(project, "tunedeck", "registry").stdout
    assert "v0.1.0" in shown.splitlines()[1] and "<- prod" in shown.splitlines()[1], shown

    # bad input: an unknown version is one sentence and exit 2
    bad = run(project, "tunedeck", "rollback", "--to", "v9.9.9", check=False)
    assert bad.returncode == 2 and "not in the registry" in bad.stderr and "Traceback" not in bad.stderr

    # accountability: each verdict's record (who, when, why, data, code, params) in promotion.json and the tags
    verdict = json.loads((project / "promotion.json").read_text())
    assert verdict["audit"]["who"] == "tunedeck tests <tests@tunedeck.invalid>" and verdict["audit"]["flow_run"] is None
    assert verdict["audit"]["data_md5"].endswith(".dir") and verdict["audit"]["params"]["base"]["seed"] == 7
    chain = run(project, "tunedeck", "registry", "--audit", "v0.1.0").stdout.splitlines()
    assert [line.split("  ", 1)[1].split(" by ")[0] for line in chain[::2]] == \
        ["v0.1.0 registered", "v0.1.0 made prod", "v0.1.0 made prod"], chain
    assert chain[4].endswith("rollback from v0.2.0 to v0.1.0") and "by tunedeck tests <tests@tunedeck.invalid>" in chain[4]
    assert chain[1].startswith("    by hand (no Prefect flow run); code ") and "params sha256 " in chain[1], chain
    assert "| approved by | tunedeck tests <tests@tunedeck.invalid> |" in (project / "MODEL_CARD.md").read_text()

    # verify: the version's model file and data hold to its record; one byte changed in the DVC cache fails it
    held = run(project, "tunedeck", "verify", "v0.2.0")
    assert held.stdout.rstrip().endswith("v0.2.0 is the model and data its record names."), held.stdout
    lock = yaml.safe_load(run(project, "git", "show", f"{tags_commit(project, 'model@v0.2.0')}:dvc.lock").stdout)
    md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.safetensors")
    cached = project / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    cached.chmod(0o644)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 1
    cached.write_bytes(bytes(data))
    broken = run(project, "tunedeck", "verify", "v0.2.0", check=False)
    assert broken.returncode == 1, broken.stdout
    said = broken.stderr.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("tunedeck verify: v0.2.0's model file hashes to sha256 "), said
    assert str(cached) in said[0] and said[0].endswith("delete that copy and `dvc pull` from a trusted remote.")
    unknown = run(project, "tunedeck", "verify", "v9.9.9", check=False)
    assert unknown.returncode == 2 and "there is no registered version v9.9.9" in unknown.stderr

    # explain: top classes and a Grad-CAM overlay per image, with the randomisation check's figure
    shown = run(project, "tunedeck", "explain", "--model", "v0.1.0", "data/tiny/red/000.png", "--out", str(tmp_path / "why"))
    assert shown.stdout.startswith("data/tiny/red/000.png: ") and (tmp_path / "why" / "000-gradcam.png").is_file()
    assert "sanity check (model randomisation, Adebayo et al. 2018): rank correlation" in shown.stdout, shown.stdout
    missing = run(project, "tunedeck", "explain", "nope.png", check=False)
    assert missing.returncode == 2 and "nope.png: no such file: name image files that exist." in missing.stderr


def tags_commit(project: Path, tag: str) -> str:
    return run(project, "git", "rev-list", "-n", "1", tag).stdout.strip()
