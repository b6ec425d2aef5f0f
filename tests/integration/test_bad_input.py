"""Every bad input to a stage: one clear sentence, a non-zero exit, no traceback, the source untouched."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from tests.integration.project import make_project, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("bad"))


@pytest.fixture
def with_params(project):
    """Edit params.yaml for one test, then put it back."""
    original = (project / "params.yaml").read_text()

    def edit(change):
        raw = yaml.safe_load(original)
        change(raw)
        (project / "params.yaml").write_text(yaml.safe_dump(raw))

    yield edit
    (project / "params.yaml").write_text(original)


def stage(project, name: str):
    return run(project, "python", "-m", f"flows.stages.{name}", check=False, TUNEDECK_PREFECT="off")


def assert_one_sentence(proc, *needles: str):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def tree_md5(folder):
    return sorted(hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file())


CASES = {
    "missing source": ("prepare", lambda r: r["data"].update(source="data/nowhere"), ["data.source 'data/nowhere' does not exist"]),
    "unknown key": ("prepare", lambda r: r["train"].update(learning_rate=0.1), ["unknown key 'train.learning_rate'"]),
    "wrong type": ("train", lambda r: r["train"].update(batch_size="big"), ["train.batch_size must be a valid integer"]),
    "lr not positive": ("train", lambda r: r["train"].update(lr=0), ["train.lr must be greater than 0"]),
    "unknown model": ("train", lambda r: r["model"].update(name="resnet-18"), ["model.name 'resnet-18' is not a timm model", "resnet18"]),
    "no pretrained weights reachable": ("train", lambda r: r["model"].update(name="resnet18", pretrained=True), ["not in the Hugging Face cache"]),
    "pretrained file missing": ("train", lambda r: r["model"].update(pretrained="weights/none.safetensors"), ["does not exist"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(project, with_params, case):
    name, change, needles = CASES[case]
    if name == "train" and not (project / "data" / "prepared" / "manifest.json").exists():
        assert stage(project, "prepare").returncode == 0
    with_params(change)
    assert_one_sentence(stage(project, name), *needles)


def test_broken_files_are_reported_and_the_run_goes_on(project, with_params, tmp_path):
    source = project / "data" / "tiny"
    (source / "red" / "zero.png").write_bytes(b"")
    (source / "green" / "cut.png").write_bytes((source / "green" / "000.png").read_bytes()[:60])
    (source / "blue" / "readme.txt").write_text("hello")
    (source / "empty").mkdir()
    before = tree_md5(source)
    proc = stage(project, "prepare")
    assert proc.returncode == 0, proc.stderr
    assert "4 file(s) left out" in proc.stderr and "zero.png: empty file" in proc.stderr
    report = (project / "data" / "prepared" / "rejected.json").read_text()
    assert "cut.png" in report and "readme.txt" in report and "no usable images" in report
    assert tree_md5(source) == before


def test_only_one_class_left_is_an_error(project, with_params, tmp_path):
    from tests.conftest import write_images

    write_images(project / "data" / "single", {"only": 4})
    with_params(lambda r: r["data"].update(source="data/single"))
    assert_one_sentence(stage(project, "prepare"), "needs at least 2 classes")


def test_dvc_remote_problems_are_one_sentence_each(tmp_path, monkeypatch):
    """No default remote, and a remote nothing listens on: each named, with what to do (credentials: test_remote)."""
    from flows.core.errors import TunedeckError
    from flows.gateways.dvc.cli import sync

    monkeypatch.chdir(tmp_path)
    run(tmp_path, "git", "init", "-q")
    run(tmp_path, "dvc", "init", "-q")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a")
    run(tmp_path, "dvc", "add", "-q", "d")
    with pytest.raises(TunedeckError, match=r"there is no default DVC remote: add one with `dvc remote add -d"):
        sync("push")
    run(tmp_path, "dvc", "remote", "add", "-d", "far", "ssh://nobody@127.0.0.1:9/srv/dvc")
    with pytest.raises(TunedeckError) as refused:
        sync("push")
    assert "this host cannot reach the DVC remote 'far' (ssh://nobody@127.0.0.1:9/srv/dvc)" in str(refused.value)
