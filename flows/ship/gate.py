"""Shipping a model: the promotion gate, rollback and the model a prediction uses.

`judge` scores the candidate (the model in a folder's models/) and prod (from the registry) on
the candidate's test split, applies the gate (flows.core.promotion) and writes promotion.json,
plus MODEL_CARD.md when it promotes. `register` then tags the commit that holds them (a DVC
experiment of the folder) as the next version and makes it prod. The pipeline deployment does
both as its last step; `tunedeck promote` does them for a clone after `dvc repro`.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.contracts import ModelCard
from flows.core.errors import TunedeckError
from flows.core.params import Params
from flows.core.paths import EVAL, MODEL_WEIGHTS, MODELS, PREPARED
from flows.core.promotion import Decision, Figures, decide, not_compared
from flows.gateways.git import git, head, probe
from flows.ship import audit, registry

PROMOTION_FILE = "promotion.json"
CARD_FILE = "MODEL_CARD.md"
MODEL_CACHE = Path(".tunedeck") / "models"  # registry versions fetched for predict, by version


@dataclass(frozen=True)
class Judgement:
    """The gate's decision on a folder's model, and the version it gets when promoted."""

    decision: Decision
    version: str | None  # set when promoted
    prod_version: str | None
    candidate_sha256: str
    audit: dict | None = None  # who, when, why, data, code, params (flows.ship.audit)


def figures_of(model_path: Path, root: Path, params: Params) -> tuple[Figures, list[str], np.ndarray | None]:
    """A model file's figures on root's test split, its classes and its predictions (None: other classes)."""
    from flows.core.augment import Normalizer
    from flows.core.devices import resolve_device
    from flows.core.model_file import load_model
    from flows.core.prepare import load_manifest, load_split
    from flows.core.scoring import logits_of

    device = resolve_device(params.base.device)
    model, meta = load_model(model_path, device)
    classes = load_manifest(root / PREPARED).classes
    if meta.classes != classes:
        return Figures(0.0, {}, 0), meta.classes, None
    images, labels = load_split(root / PREPARED, "test")
    logits = logits_of(model, Normalizer(meta.mean, meta.std, device), images, params.evaluate.batch_size)
    pred = logits.argmax(1) if len(labels) else labels
    return Figures.of(labels, pred, classes), meta.classes, pred


def judge(root: Path, params: Params, force: bool = False, log=print) -> Judgement:
    """Apply the promotion gate to root's trained model; write promotion.json (and MODEL_CARD.md when promoted).

    A prod model that cannot be fetched (not in this clone's DVC cache nor its remote) does not fail
    the gate: its verdict is "could not compare", which promotes nothing, and the sentence says why.
    """
    card = check_candidate(root)
    candidate, _, candidate_pred = figures_of(root / MODEL_WEIGHTS, root, params)
    current = registry.prod(root)
    tolerance, max_drop = params.promote.tolerance, params.promote.max_class_drop
    try:
        prod_figures, notes, prod_pred = prod_figures_of(root, params, current, card.classes)
        checks, group_reasons = group_check(root, params, candidate_pred, None if notes else prod_pred)
        decision = decide(candidate, prod_figures, tolerance, max_drop, checks, group_reasons)
    except registry.ModelUnavailable as exc:
        prod_figures, notes = None, []
        decision = not_compared(candidate, str(exc).rstrip("."), tolerance, max_drop)
    if notes and not force:
        decision = Decision(False, [*decision.reasons, *notes, "promote it anyway with --force"], candidate, None,
                            decision.tolerance, decision.max_class_drop, notes, groups=decision.groups)
    elif force and not decision.promote:
        decision = Decision(True, [], candidate, prod_figures, decision.tolerance, decision.max_class_drop,
                            [f"forced past: {'; '.join(decision.reasons + notes)}"], decision.compared, decision.groups)
    version = registry.next_version(root) if decision.promote else None
    entry = audit.record(root, decision.summary(), card.data_version, params.to_dict())
    judgement = Judgement(decision, version, current.version if current else None, card.sha256, entry)
    write_promotion(root, judgement)
    if version:
        write_card(root, params, card, judgement)
    log(f"promotion gate: {decision.summary()}")
    return judgement


def read_judgement(root: Path) -> Judgement:
    """The judgement write_promotion wrote in root (flows.ship.judging's, made in a process of its own)."""
    record = json.loads((root / PROMOTION_FILE).read_text())
    prod = record["prod"]
    decision = Decision(record["promote"], record["reasons"], Figures(**record["candidate"]),
                        Figures(**prod) if prod else None, record["tolerance"], record["max_class_drop"], record["notes"],
                        record["compared"], record["groups"])
    return Judgement(decision, record["version"], record["prod_version"], record["candidate_sha256"], record["audit"])


def check_candidate(root: Path) -> ModelCard:
    """root's model card, once its weights and test metrics are there and match it."""
    from flows.core.model_file import sha256

    card = ModelCard.read(root / MODELS)
    weights = root / MODEL_WEIGHTS
    if not weights.is_file() or sha256(weights) != card.sha256:
        raise TunedeckError(f"{weights} does not match {root / MODELS / 'model.json'}: run the train stage again (`dvc repro train`).")
    if not (root / EVAL / "metrics.json").is_file():
        raise TunedeckError(f"{root / EVAL / 'metrics.json'} not found: run the evaluate stage first (`dvc repro evaluate`).")
    return card


def prod_figures_of(root: Path, params: Params, current: registry.Version | None,
                    classes: list[str]) -> tuple[Figures | None, list[str], np.ndarray | None]:
    """Prod's figures on root's test split (None when there is no prod), notes on why they cannot count, and its
    predictions.

    Raises registry.ModelUnavailable when prod's model file cannot be fetched.
    """
    if current is None:
        return None, [], None
    with tempfile.TemporaryDirectory() as tmp:
        prod_file = registry.fetch(root, Path(tmp) / "prod.safetensors", stage=registry.PROD)
        figures, prod_classes, pred = figures_of(prod_file, root, params)
    if prod_classes != classes:
        return figures, [f"prod {current.version} has other classes ({', '.join(prod_classes)}): it cannot be scored on this test split"], None
    return figures, [], pred


def group_check(root: Path, params: Params, candidate: np.ndarray | None,
                prod: np.ndarray | None) -> tuple[list[dict], list[str]]:
    """With data.groups: the candidate's worst group against prod's, and its gap (flows.core.groups.compare)."""
    from flows.core import groups
    from flows.core.prepare import load_split

    split = groups.load(root / PREPARED, "test")
    if split is None or candidate is None:
        return [], []
    _, labels = load_split(root / PREPARED, "test")
    return groups.compare(labels, candidate, prod, split, params.promote.max_worst_group_drop, params.promote.max_group_gap)


def write_promotion(root: Path, judgement: Judgement) -> None:
    """promotion.json: the verdict, its reasons and both models' figures."""
    record = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "verdict": judgement.decision.verdict,
              "promoted": judgement.decision.promote, "summary": judgement.decision.summary(), "version": judgement.version,
              "prod_version": judgement.prod_version, "candidate_sha256": judgement.candidate_sha256,
              **judgement.decision.to_dict(), "audit": judgement.audit}
    (root / PROMOTION_FILE).write_text(json.dumps(record, indent=2))


def write_card(root: Path, params: Params, card: ModelCard, judgement: Judgement) -> None:
    """MODEL_CARD.md for the version this promotion creates."""

    from flows.core.model_card import CardFacts, render

    commit = head(root) or ""
    groups_file = root / EVAL / "groups.json"
    facts = CardFacts(card=card, params=params.to_dict(), metrics=json.loads((root / EVAL / "metrics.json").read_text()),
                      per_class=json.loads((root / EVAL / "per_class.json").read_text()), version=judgement.version or "",
                      code_commit=commit or "unknown", gate=judgement.decision.summary(),
                      groups=json.loads(groups_file.read_text()) if groups_file.is_file() else {},
                      approved_by=(judgement.audit or {}).get("who", "unknown"),
                      explanations=tuple(sorted(p.name for p in (root / EVAL / "explain").glob("*.png"))),
                      sanity=sanity_sentence(root / EVAL / "explain" / "sanity.json"))
    (root / CARD_FILE).write_text(render(facts))


def sanity_sentence(path: Path) -> str:
    """The randomisation check's sentence from eval/explain/sanity.json ("" when there is none)."""
    try:
        return str(json.loads(path.read_text())["verdict"])
    except (OSError, ValueError, KeyError):
        return ""


def markdown(judgement: Judgement) -> str:
    """The verdict as a Markdown table: both models' figures side by side, then the reasons."""
    d = judgement.decision
    prod = d.prod
    lines = [f"**{d.summary()}**", "", f"| | candidate ({judgement.version or 'not registered'}) | prod ({judgement.prod_version or 'none'}) |",
             "|---|---|---|", f"| test accuracy | {d.candidate.accuracy:.4f} | {prod.accuracy:.4f} |" if prod
             else f"| test accuracy | {d.candidate.accuracy:.4f} | |"]
    for name, recall in d.candidate.recall.items():
        before = f"{prod.recall.get(name, 0.0):.4f}" if prod else ""
        lines.append(f"| recall {name} | {recall:.4f} | {before} |")
    for check in d.groups:
        theirs = f"{check['prod_worst']} {check['prod_worst_accuracy']:.4f}" if "prod_worst" in check else ""
        lines.append(f"| worst {check['attribute']} group | {check['worst']} {check['worst_accuracy']:.4f} | {theirs} |")
    lines += ["", f"tolerance {d.tolerance}, max class drop {d.max_class_drop}, {d.candidate.n_test} test images"]
    lines += [f"- {reason}" for reason in d.reasons + d.notes]
    return "\n".join(lines)


def register(root: Path, judgement: Judgement, commit: str) -> list[str]:
    """Tag commit as the judged version and make it prod; push the tags to origin when there is one."""
    if not judgement.decision.promote or not judgement.version:
        return []
    summary = judgement.decision.summary()
    tags = registry.register_prod(root, commit, judgement.version,
                                  registry.tag_message(summary, judgement.audit) if judgement.audit else summary)
    why = registry.push_tags(root, tags)
    if why:
        print(f"tunedeck: the registry tags {', '.join(tags)} stay on this clone: git push failed ({why}); push them with `git push origin --tags`.")
    return tags


def exp_commit(root: Path, name: str) -> str:
    """The commit of DVC experiment name, saved from root's HEAD."""

    commit = git("rev-parse", "HEAD", cwd=root).strip()
    ref = f"refs/exps/{commit[:2]}/{commit[2:]}/{name}"
    found = probe("rev-parse", "--verify", ref, cwd=root)
    if found is None:
        raise TunedeckError(f"DVC experiment '{name}' was not found in {root} ({ref}): `dvc exp show` lists the experiments.")
    return found.strip()


def resolve_model(spec: str, root: Path) -> tuple[Path, str]:
    """(model file, version) for predict's --model: prod, a registry version vX.Y.Z, or a .safetensors path."""
    path = Path(spec)
    if path.is_file():
        return path, "file"
    if spec != registry.PROD and not spec.startswith("v"):
        raise TunedeckError(f"--model {spec}: no such file; give prod, a registry version (vX.Y.Z) or a .safetensors file.")
    version = registry.prod(root) if spec == registry.PROD else next((v for v in registry.versions(root) if v.version == spec), None)
    if version is None:
        known = ", ".join(v.version for v in registry.versions(root)) or "none yet"
        what = "there is no prod model yet (`tunedeck promote` makes one)" if spec == registry.PROD else f"version {spec} is not registered"
        raise TunedeckError(f"--model {spec}: {what}; registered versions: {known}.")
    cached = root / MODEL_CACHE / f"{version.version}-{version.commit[:12]}.safetensors"
    if not cached.is_file():
        registry.fetch(root, cached.with_suffix(".part"), version=version.version)
        cached.with_suffix(".part").rename(cached)
    return cached, version.version


RESULT_PATHS = ("dvc.lock", "params.yaml", "eval/", "dvclive/", "export/", CARD_FILE, PROMOTION_FILE)


def save_results(root: Path, name: str) -> str:
    """`dvc exp save` of root's results (the stages' untracked outputs too) as experiment name; its commit."""

    import yaml

    from flows.gateways.dvc.cli import dvc

    others = git("ls-files", "--others", "--exclude-standard", cwd=root).split()
    include = [path for path in others if path.startswith(RESULT_PATHS)]
    ran = list(yaml.safe_load((root / "dvc.lock").read_text()).get("stages", {})) if (root / "dvc.lock").is_file() else []
    # only the stages that ran (a `dvc repro evaluate` leaves export's outputs missing, which exp save refuses)
    dvc("exp", "save", "--force", "-n", name, *(arg for path in include for arg in ("-I", path)), *ran, cwd=root)
    return exp_commit(root, name)


def promote_clone(root: Path, params: Params, force: bool = False) -> dict:
    """`tunedeck promote`: the gate on root's model; when it passes, its results saved as a DVC experiment,
    tagged as the next version and made prod, and the model pushed to the default DVC remote."""
    from flows.gateways.git import host_lock

    with host_lock(root, "registry"):  # the pipeline runs of this clone take the same turn
        return _promote_clone(root, params, force)


def _promote_clone(root: Path, params: Params, force: bool) -> dict:
    from flows.gateways.dvc.cli import default_remote, sync

    judgement = judge(root, params, force)
    summary = {"verdict": judgement.decision.verdict, "promoted": judgement.decision.promote, "decision": judgement.decision.summary(),
               "candidate_accuracy": round(judgement.decision.candidate.accuracy, 4),
               "prod_version": judgement.prod_version or "none"}
    if judgement.decision.prod is not None:
        summary["prod_accuracy"] = round(judgement.decision.prod.accuracy, 4)
    if not judgement.decision.promote:
        return summary
    if default_remote(root)[0]:  # other hosts `dvc artifacts get` it from there
        sync("push", str(MODEL_WEIGHTS), cwd=root)
    commit = save_results(root, f"promote-{judgement.version}")
    tags = register(root, judgement, commit)
    return {**summary, "version": judgement.version, "commit": commit[:12], "tags": " ".join(tags)}


def rollback(root: Path, version: str, params: Params | None = None) -> dict:
    """`tunedeck rollback --to vX`: make an earlier version prod again with one more tag; nothing is deleted."""
    before = registry.prod(root)
    why = f"rollback from {before.version if before else 'none'} to {version}"
    entry = audit.record(root, why, None, params.to_dict() if params is not None else {})
    tag = registry.assign_prod(root, version, registry.tag_message(why, entry))
    why = registry.push_tags(root, [tag])
    if why:
        print(f"tunedeck: the tag {tag} stays on this clone: git push failed ({why}).")
    return {"prod": version, "was": before.version if before else "none", "tag": tag}
