"""The promotion gate at the end of a pipeline run through a real worker: its exact verdict, recorded
in promotion.json (saved with the run's DVC experiment), the `promotion` artifact and the registry's tags.

The verdicts' boundaries (just inside, just outside the tolerance) are unit tests on the pure decision
(tests/unit/test_promotion.py); here each run's setup makes its verdict certain.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flows.host import server
from flows.ship.gate import exp_commit
from tests.integration.project import api, env, free_port, make_project, run, wait
from tests.integration.test_deployments import logs, start

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def deployed(project: Path) -> Iterator[str]:
    """A Prefect server for project, its deployments, and one worker in it; all stopped at the end."""
    url = server.start(free_port(), root=project)
    worker = None
    try:
        run(project, "tunedeck", "deploy", PREFECT_API_URL=url)
        worker = subprocess.Popen(["tunedeck", "worker", "--pool", "local"], cwd=project, env=env(PREFECT_API_URL=url),
                                  stdout=subprocess.DEVNULL, stderr=open(project.parent / "worker.log", "w"), start_new_session=True)
        yield url
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
        server.stop(root=project)


def trained_well(project: Path) -> Path:
    """The tiny project trained long enough that its colour classes are learnt outright (as test_registry does)."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["train"].update(epochs=4, lr=0.01)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(project, "git", "commit", "-qam", "train longer")
    return project


def tags(project: Path, pattern: str = "model*") -> set[str]:
    return set(run(project, "git", "tag", "--list", pattern).stdout.split())


def gate_of(project: Path, url: str, run_id: str) -> tuple[dict, dict]:
    """(promotion.json as saved in the run's DVC experiment, the run's `promotion` artifact)."""
    name = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]["name"]
    record = json.loads(run(project, "git", "show", f"{exp_commit(project, name)}:promotion.json").stdout)
    artifacts = api(url, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return record, next(a for a in artifacts if a["key"] == "promotion")


def pipeline(url: str, *overrides: str) -> dict:
    """One pipeline run to its end, which must be Completed."""
    done = wait(url, start(url, "pipeline", overrides=list(overrides), pull=False, push=False), timeout=600)  # hang guard
    assert done["state_type"] == "COMPLETED", logs(url, done["id"])[-3000:]
    return done


def test_the_first_run_is_promoted_and_an_untrained_candidate_rejected(tmp_path):
    """No prod yet: promoted, v0.1.0, prod. Then a candidate trained at a learning rate of 1e-9 (its weights
    stay the random initialisation's) against that prod on a task of three colours: rejected, no tag.

    Not a seed's margin: a model trained on solid colours gets them right, an untrained one does not.
    """
    project = trained_well(make_project(tmp_path / "clone"))
    with deployed(project) as url:
        first = pipeline(url)
        record, artifact = gate_of(project, url, first["id"])
        assert (record["verdict"], record["version"], record["prod_version"]) == ("promoted", "v0.1.0", None), record
        assert artifact["description"] == "promoted: there is no prod model yet."
        assert tags(project) == {"model@v0.1.0", "model#prod#1"}

        worse = pipeline(url, "train.lr=1e-9")
        record, artifact = gate_of(project, url, worse["id"])
        assert (record["verdict"], record["version"], record["prod_version"]) == ("rejected", None, "v0.1.0"), record
        assert record["prod"]["accuracy"] > record["candidate"]["accuracy"], record
        assert artifact["description"] == record["summary"] and artifact["description"].startswith("rejected: ")
        assert tags(project) == {"model@v0.1.0", "model#prod#1"}, "a rejected candidate is not registered"


def test_a_prod_model_missing_from_the_remote_is_could_not_compare_and_the_run_completes(tmp_path):
    """A new colleague's clone: the registry's tags name prod v0.1.0, but its model is in neither the clone's
    DVC cache nor its remote. The run completes, its experiment is saved, and the gate records "could not
    compare" with one sentence naming the version and the remote; nothing is promoted."""
    origin = trained_well(make_project(tmp_path / "origin"))
    run(origin, "dvc", "repro", "evaluate", TUNEDECK_PREFECT="off")
    run(origin, "tunedeck", "promote", TUNEDECK_PREFECT="off")
    clone = tmp_path / "colleague"
    run(tmp_path, "git", "clone", "-q", str(origin), str(clone))  # the tags come along; the DVC cache does not
    remote = clone / "dvc-remote"  # .dvc/config's ../dvc-remote, from this clone: a remote that lacks the model
    assert tags(clone) == {"model@v0.1.0", "model#prod#1"} and not remote.exists()
    commit = run(clone, "git", "rev-list", "-n", "1", "model@v0.1.0").stdout.strip()
    with deployed(clone) as url:
        done = pipeline(url, "train.epochs=3")  # a model of its own: prod's file (same params) would be in the cache
        record, artifact = gate_of(clone, url, done["id"])
    why = (f"model v0.1.0 (commit {commit[:12]}, prod) is in neither this clone's DVC cache nor its DVC remote "
           f"'local' ({remote})")
    assert (record["verdict"], record["promoted"], record["prod_version"]) == ("could not compare", False, "v0.1.0"), record
    assert record["reasons"][0].startswith(why), record["reasons"]
    assert artifact["description"] == record["summary"] and artifact["description"].startswith(f"could not compare: {why}")
    assert record["summary"].count(". ") == 0 and "\n" not in record["summary"], "one sentence"
    assert tags(clone) == {"model@v0.1.0", "model#prod#1"}, "nothing is promoted past a prod it could not compare with"
