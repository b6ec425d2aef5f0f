"""Drift → event → retrain, with a live Prefect server, the deployments' trigger and a worker.

Two triggers, each through the real server and worker. monitor.trigger: drift (below, first test):

The prod model (promoted from a first `dvc repro`) is monitored batch by batch with
`tunedeck monitor`: a one-batch blip (colour-inverted images between batches of the training
images) starts nothing; a shift that lasts monitor.consecutive (2 here) batches starts exactly one
pipeline run through the trigger on `tunedeck.drift.detected`, and that retrain passes the gate: it
trains the same data with the same params as prod, so its model is prod's file and the verdict is
certain (promoted, as v0.2.0). monitor.trigger: estimated_drop (second test): the retrain follows
the accuracy estimated without labels, not the drift statistics: a slight blur the statistics flag
but the model shrugs off starts nothing, a batch whose colour signal faded, halving the accuracy,
starts exactly one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageFilter, ImageOps

from flows.contracts import DRIFT_EVENT, MONITOR_EVENT, ModelCard
from flows.ship import registry
from tests.integration.project import api, make_project, run, wait
from tests.integration.test_deployments import logs
from tests.integration.test_gate import deployed

pytestmark = pytest.mark.slow


def inverted(source: Path, dest: Path) -> Path:
    """The same images with their colours inverted: a shift the model has never seen."""
    for path in source.rglob("*.png"):
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(path).convert("RGB")).save(target)
    return dest


def retrains(url: str) -> list[dict]:
    runs = api(url, "flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC", "limit": 200})
    return [r for r in runs if (r.get("parameters") or {}).get("reason", "").startswith("drift")]


def events(url: str, name: str, at_least: int) -> list[dict]:
    """The server's events named name, once at least at_least are stored (the server files them a moment
    after it takes them)."""
    deadline = time.monotonic() + 60  # a hang guard
    while True:
        found = api(url, "events/filter", {"filter": {"event": {"name": [name]}}, "limit": 50})["events"]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


@contextlib.contextmanager
def promoted_and_watched(project: Path) -> Iterator[str]:
    """A live server for project with its deployments and a worker (test_gate.deployed), the first model trained
    and promoted: the server's URL."""
    with deployed(project) as url:
        run(project, "dvc", "repro", "evaluate", PREFECT_API_URL=url)
        run(project, "tunedeck", "promote", PREFECT_API_URL=url)
        yield url


def the_one_retrain(url: str, what: str) -> dict:
    """The retrain the event started, once it Completed; that no second one started from the same event."""
    deadline = time.monotonic() + 120  # a hang guard: the trigger starts the run within seconds
    while not retrains(url):
        assert time.monotonic() < deadline, f"the {what} started no retrain"
        time.sleep(0.5)
    done = wait(url, retrains(url)[0]["id"], timeout=600)  # a hang guard
    assert done["state_type"] == "COMPLETED", logs(url, done["id"])[-3000:]
    started = retrains(url)  # the retrain took a while: a second run from the one event would be here by now
    assert len(started) == 1, [r["name"] for r in started]
    return done


def test_a_lasting_shift_starts_one_retrain_and_a_blip_none(tmp_path):
    project = make_project(tmp_path / "clone")
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["monitor"]["consecutive"] = 2
    raw["data"].update(val_fraction=0.3, test_fraction=0.4)  # 21 held-out images: the reference needs at least 20
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(project, "git", "commit", "-qam", "retrain after two drifted batches")
    with promoted_and_watched(project) as url:
        prod_sha256 = ModelCard.read(project / "models").sha256
        assert (project / "eval" / "reference" / "features.npy").is_file()
        normal = shutil.copytree(project / "data" / "tiny", tmp_path / "normal")  # the training images: no drift
        shifted = inverted(normal, tmp_path / "shifted")

        def monitor(folder: Path) -> dict:
            run(project, "tunedeck", "monitor", str(folder), PREFECT_API_URL=url)
            return json.loads((project / "monitor" / "last.json").read_text())

        # a blip: drift, then none, then drift again — never two in a row
        assert [monitor(f)["drifted"] for f in (shifted, normal, shifted)] == [True, False, True]
        # a lasting shift: the second drifted batch in a row emits the event
        last = monitor(shifted)
        assert last["drifted"] and last["streak"] == 2 and last["triggered"]
        # the monitor's own record of each batch: the retrain event went out once, for the fourth batch
        history = [json.loads(line) for line in (project / "monitor" / "history.jsonl").read_text().splitlines()]
        assert [batch["triggered"] for batch in history] == [False, False, False, True]
        for batch in history:  # estimated without labels, and measured too (the batches came as class folders)
            assert set(batch["estimated_accuracy"]) == {"atc", "confidence"} and batch["accuracy"] is not None
            assert all(e["low"] <= e["value"] <= e["high"] for e in batch["estimated_accuracy"].values())
            assert abs(sum(p["value"] for p in batch["priors"].values()) - 1) < 1e-6
        assert len(events(url, DRIFT_EVENT, 1)) == 1, "one drift event on the server, so at most one retrain"
        done = the_one_retrain(url, "drift event")
        assert len(events(url, DRIFT_EVENT, 1)) == 1
        # the gate's verdict: the retrain's model is prod's own file, so it is certainly promoted
        artifacts = api(url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [done["id"]]}}})
        versions = next(a["data"] for a in artifacts if a["key"] == "versions")
        assert f"| model_sha256 | {prod_sha256} |" in versions, versions
        verdict = next(a for a in artifacts if a["key"] == "promotion")
        assert verdict["description"].startswith("promoted: test accuracy "), verdict["description"]
        assert registry.prod(project).version == "v0.2.0"
        assert len(events(url, MONITOR_EVENT, 4)) == 4, "every batch is an event the dashboard reads"


def faint_colours(folder: Path, per_class: int, seed: int, signal: float = 1.0, blur: float = 0.0) -> Path:
    """Three classes of 20 px images: uniform noise with one colour channel raised by a random amount (a weak
    raise is a hard image, so the model is right on most but not all, and its confidence means something);
    signal scales the raise (a faded batch), blur softens the noise (a batch that looks different, same colours)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("red", "green", "blue")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.uniform(0, 140, (20, 20, 3))
            pixels[..., c] += rng.uniform(0, 40) * signal
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            (image.filter(ImageFilter.GaussianBlur(blur)) if blur else image).save(folder / name / f"{i:03d}.png")
    return folder


def test_estimated_drop_retrains_on_a_halved_accuracy_and_not_on_a_harmless_shift(tmp_path):
    project = make_project(tmp_path / "clone")
    shutil.rmtree(project / "data" / "tiny")
    faint_colours(project / "data" / "tiny", 40, seed=0)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["monitor"].update(trigger="estimated_drop", estimator="atc", consecutive=1)
    raw["train"].update(epochs=6, lr=0.01)
    raw["data"].update(val_fraction=0.3, test_fraction=0.2)  # 36 reference images to fit ATC's threshold on
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "faint colours; retrain on an estimated accuracy drop")
    with promoted_and_watched(project) as url:
        def monitor(folder: Path) -> dict:
            out = run(project, "tunedeck", "monitor", str(folder), PREFECT_API_URL=url).stdout
            assert "estimated accuracy without labels: atc " in out, out
            return json.loads((project / "monitor" / "last.json").read_text())

        drop = raw["monitor"]["estimated_drop"]
        # new images like the training ones (class folders, so the monitor also measures their accuracy)
        normal = monitor(faint_colours(tmp_path / "normal", 40, seed=7))
        assert not normal["counted"] and not normal["triggered"]
        # the same images predicted with their own class mix corrected for (EM): the mix is printed, rows written
        out = run(project, "tunedeck", "predict", "--model", "prod", "--input", str(tmp_path / "normal"), "--out",
                  str(tmp_path / "normal.csv"), "--prior-shift").stdout
        assert "corrected for the images' class mix, estimated by EM: blue " in out, out
        assert len((tmp_path / "normal.csv").read_text().splitlines()) == 1 + 120
        # a slight blur: the drift statistics flag it, so trigger: drift would retrain; accuracy barely moves
        # (less than the tolerated drop), the estimate says so, and nothing starts
        blurred = monitor(faint_colours(tmp_path / "blurred", 40, seed=7, blur=0.5))
        assert blurred["drifted"], blurred["statistics"]
        assert blurred["accuracy"] > normal["accuracy"] - drop, (normal["accuracy"], blurred["accuracy"])
        assert blurred["harmful"] is False and not blurred["counted"] and not blurred["triggered"]
        # the colour signal faded: accuracy roughly halves (measured), the estimate falls with it: one retrain event
        faded = monitor(faint_colours(tmp_path / "faded", 40, seed=7, signal=0.08))
        assert faded["accuracy"] < 0.7 * normal["accuracy"], (normal["accuracy"], faded["accuracy"])
        assert faded["harmful"] and faded["counted"] and faded["triggered"], faded["estimated_accuracy"]
        assert faded["estimated_accuracy"]["atc"]["high"] < faded["reference_accuracy"] - drop
        sent = events(url, DRIFT_EVENT, 1)
        assert len(sent) == 1, "the blurred batch sent no retrain event, the faded one one"
        assert "estimated accuracy drop (atc " in sent[0]["payload"]["summary"], sent[0]["payload"]
        assert sent[0]["payload"]["batch"]["estimated_accuracy"]["atc"] == faded["estimated_accuracy"]["atc"]
        done = the_one_retrain(url, "estimated drop")
        assert "estimated accuracy drop" in done["parameters"]["reason"], done["parameters"]
        assert len(events(url, DRIFT_EVENT, 1)) == 1
        # the three batches came labelled: each estimator's record against the measured accuracy
        table = run(project, "tunedeck", "monitor", "--errors").stdout.splitlines()
        assert table[0].startswith("| estimator | labelled batches |") and table[2].startswith("| atc | 3 |"), table
        missing = run(project, "tunedeck", "monitor", check=False)
        assert missing.returncode == 2 and "name the folder of new images" in missing.stderr, missing.stderr
