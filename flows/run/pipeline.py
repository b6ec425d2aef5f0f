"""The Prefect flows deployments run: the DVC pipeline stage by stage, and an ad-hoc experiment.

Each run works in a workspace of its own (flows.run.workspace: a git worktree of the worker's
clone at its commit, sharing the DVC cache); its overrides go to that workspace's params.yaml
alone, and its results come back as a DVC experiment named after the flow run. Each DVC stage
is a Prefect task (`dvc repro --single-item <stage>`) in dvc.yaml's order, with retries and the
stage's DVC lock entry as its cache key: a retry skips finished stages, and the train stage
resumes from its checkpoint (kept per run key in the clone's checkpoints/, so a run started
again in a new workspace resumes too). The run holds a GPU slot (a Prefect global concurrency
limit of 1 per GPU) for its whole length, and pins the GPU with CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.contracts import LABEL, ModelCard
from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.gateways import prefect_api
from flows.gateways.dvc.cli import sync
from flows.gateways.git import git, head, host_lock
from flows.run import workspace
from flows.run.labels import flush_labels, label_cost, label_run, label_scores
from flows.run.multinode import train_across_nodes
from flows.run.session import dvc_session, open_session, run_stage, stage_env
from flows.run.slot import device_slot
from flows.run.workspace import run_name, run_workspace, timed
from flows.stages.warm import WarmStages


@flow(name="pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, pull: bool = True, push: bool = True, promote: bool = True,
             reason: str = "") -> dict:
    """dvc pull, every stage of dvc.yaml in order, dvc push, the promotion gate, in the run's own workspace;
    overrides as key=value.

    The run ends as a DVC experiment named after the flow run (`dvc exp show` in the clone lists it);
    when the gate promotes its model, that experiment's commit is the new prod version (GTO tags).
    """
    if reason:  # what started it (the drift trigger says which batch), on the run for the dashboard
        get_run_logger().info(f"started by {reason}")
        label_run({f"{LABEL}reason": reason[:200]})
    return run_pipeline(overrides or [], pull, push, run_name(), promote)


def run_pipeline(overrides: list[str], pull: bool, push: bool, name: str, promote: bool = False,
                 until: str | None = None) -> dict:
    """The stages in the run's own workspace, each a task (with `until`, only that stage and those it needs); the
    results saved as DVC experiment `name`."""
    logger = get_run_logger()
    settings = Settings.read()  # this flow is its run's process's work
    code = code_version()
    logger.info(f"code: {code}")
    clone = Path.cwd()
    with (open_session(clone) as session, WarmStages() as warm, run_workspace(clone, overrides) as ws,
          device_slot(settings) as slot):
        session.workdir = ws
        stages_settings = settings.but(checkpoints=clone / "checkpoints")  # per run key: a retry here resumes
        if pull:  # --allow-missing: a first run finds nothing on the remote yet
            sync("pull", "--allow-missing", cwd=ws, on_line=logger.info)
        elif workspace.tracks_dvc_data(ws):  # .dvc-tracked data (or a committed dvc.lock), linked from the shared cache
            timed("data checked out", lambda: dvc_session().run(["checkout", "--allow-missing"], on_line=logger.info))
        stages = stages_for(until)
        for stage in stages:
            if stage == "train" and (nodes := node_count(ws)) > 1:  # one run over several hosts: flows.run.multinode
                label_run({f"{LABEL}nodes": nodes})  # a retry would find no nodes to meet: none
                train_across_nodes(ws, overrides, nodes, settings, lambda placed: run_stage.with_options(retries=0)(
                    "train", stage_env(slot, stages_settings.but(**placed))))
            else:
                run_stage(stage, stage_env(slot, stages_settings.but(warm=warm.socket_path())))
        label_scores(ws)
        label_cost(ws)
        if push:
            sync("push", cwd=ws, on_line=logger.info)
        # one gate at a time on this clone: two runs ending together would both judge against the same
        # prod and claim the same next version
        with host_lock(clone, "registry") if promote else contextlib.nullcontext():
            judgement = promotion_gate(ws, stage_env(slot, stages_settings.but(warm=warm.socket_path()))) if promote else None
            timed("results saved as a DVC experiment", lambda: save_experiment(clone, ws, name, stages if until else None))
            if judgement is not None and judgement.decision.promote:
                from flows.ship.gate import exp_commit, register

                logger.info(f"registry: {' '.join(register(ws, judgement, exp_commit(ws, name)))} (prod)")
        session.close()  # before its folder, the workspace, goes
        versions = attach_versions(code, ws)
        if judgement is not None:
            versions.update(verdict=judgement.decision.verdict, promoted=judgement.decision.promote, version=judgement.version or judgement.prod_version or "")
        tag_versions(versions)
        flush_labels()
        return versions


def stages_for(target: str | None) -> list[str]:
    """dvc.yaml's stages in order; with a target, it and the stages it needs (`dvc repro TARGET`); an unknown one
    in one sentence."""
    stages = dvc_session().stage_order(target)
    if not stages:
        raise TunedeckError(f"until={target!r} is not a stage of dvc.yaml (its stages: "
                            f"{', '.join(dvc_session().stage_order())}): name one of them.")
    return stages


def node_count(ws: Path) -> int:
    """base.nodes of the run's params (a bad value is the train stage's one sentence to say)."""
    import yaml

    base = (yaml.safe_load((ws / "params.yaml").read_text()) or {}).get("base") or {}
    try:
        return int(base.get("nodes") or 1)
    except (TypeError, ValueError):
        return 1


@task(name="promote", persist_result=False)
def promotion_gate(ws: Path, env: dict[str, str]):
    """The promotion gate on the run's model, its verdict as a Prefect artifact. It runs as a process of its own
    (flows.ship.judging), forked from the run's warm server like a stage, with the stage's environment (the run's GPU):
    torch and timm are never imported into the flow run's process."""
    import os
    import subprocess
    import sys

    from flows.gateways import processes
    from flows.ship.gate import markdown, read_judgement

    logger, said = get_run_logger(), []
    gate = processes.spawn([sys.executable, "-m", "flows.ship.judging"], tie=True, cwd=ws, env={**os.environ, **env},
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in gate.stdout:
            said.append(line.rstrip())
            logger.info(said[-1])
        code = gate.wait()
    except BaseException:
        gate.stop()
        raise
    if code != 0:
        last = next((line for line in reversed(said) if line.strip()), f"it ended with status {code}")
        raise TunedeckError(last.removeprefix("promotion gate: error: "))
    judgement = read_judgement(ws)
    create_markdown_artifact(markdown=markdown(judgement), key="promotion", description=judgement.decision.summary())
    return judgement


def save_experiment(clone: Path, ws: Path, name: str, stages: list[str] | None = None) -> None:
    """`dvc exp save` of the workspace as experiment <name> (of the stages that ran), one run of this clone at a
    time (shared git refs)."""
    # dvc.lock, metrics and plots: what `dvc exp run` would commit; not the link to an untracked data.source
    git("add", "-A", "--", ".", *(f":(exclude){link}" for link in workspace.source_links(ws)), cwd=ws)
    with host_lock(clone, "exp-save"):
        dvc_session().run(["exp", "save", "--force", "-n", name, *(stages or [])])
    get_run_logger().info(f"results saved as DVC experiment '{name}' (dvc exp show)")


@flow(name="experiment", log_prints=True)
def experiment(overrides: list[str] | None = None, name: str | None = None, until: str | None = None) -> dict:
    """An ad-hoc experiment, what `dvc exp run -n NAME -S ... [STAGE]` does: the stages (with `until`, e.g.
    evaluate, only that stage and those it needs) with the overrides in the run's own workspace, saved as DVC
    experiment NAME (the flow run's name by default) for `dvc exp show`.

    Not `dvc exp run` itself: it moves git refs every workspace of the clone shares for the whole
    run, so two at once on one host would trip over each other; `dvc exp save` takes a second.
    """
    return run_pipeline(overrides or [], False, False, name or run_name(), until=until)


def code_version() -> str:
    """`<folder> at <commit>` (with "+changes" when the tree differs from it): the code this run used."""
    commit = head(Path.cwd())
    if commit is None:
        return f"{Path.cwd()} (not a git clone)"
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=Path.cwd())
    return f"{Path.cwd()} at {commit[:12]}" + ("+changes" if dirty.strip() else "")


def attach_versions(code: str, root: Path) -> dict:
    """The code, data and model versions (and test metrics) of the finished run in root, as an artifact."""
    summary: dict = {"code": code}
    with contextlib.suppress(TunedeckError):
        card = ModelCard.read(root / "models")
        summary.update(data_version=card.data_version, model_sha256=card.sha256)
    with contextlib.suppress(OSError, ValueError):
        summary.update(json.loads((root / "eval/metrics.json").read_text()))
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
    create_markdown_artifact(markdown=f"| | |\n|---|---|\n{rows}\n", key="versions", description="data/model versions")
    return summary


def tag_versions(versions: dict) -> None:
    """The run's data and model versions as tags (data:<md5>, model:<sha256>, 12 digits), as a stage's run has."""
    from prefect.runtime import flow_run

    tags = [f"{kind}:{versions[key][:12]}" for kind, key in (("data", "data_version"), ("model", "model_sha256"))
            if versions.get(key)]
    if tags and flow_run.id:
        prefect_api.add_tags(flow_run.id, tags)


