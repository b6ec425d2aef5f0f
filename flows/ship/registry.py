"""The model registry, on DVC's own tools: the `model` artifact of dvc.yaml, versioned and staged
with GTO's git tags (`model@v0.3.0` registers a commit, `model#prod#N` makes a version prod).

Tags are never deleted: a rollback is one more `model#prod#N` tag on an earlier version, so the
whole history stays in git. The model file of any version comes back with
`dvc artifacts get . model --stage prod` (or `--version vX`), from the DVC cache or remote.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from flows.core.errors import TunedeckError
from flows.gateways.dvc.cli import AUTH_SIGNS, REACH_SIGNS, default_remote, dvc
from flows.gateways.git import failure, probe

ARTIFACT = "model"
PROD = "prod"


def gto_api() -> types.ModuleType:
    """gto.api, imported so that it leaves this process's logging alone.

    Importing gto runs its gto.log module, a `logging.config.dictConfig` call, which flushes and
    closes every handler of the process while it holds logging's lock. In a deployment run that
    hung the run for good: Prefect's API log handler flushes by waiting for its log worker, and the
    worker's HTTP client was waiting for that same lock (stacks in the closing note of 2026-12-07:
    a pipeline run at its first promotion, only on a busy machine). So gto.log is replaced by an
    empty module before gto is imported; gto's loggers then log through the process's own handlers.
    """
    if "gto.log" not in sys.modules:
        sys.modules["gto.log"] = types.ModuleType("gto.log", "stands in for gto's logging setup: see gto_api()")
    import gto.api

    return gto.api


@dataclass(frozen=True)
class Version:
    """One registered version of the model: its name (vX.Y.Z) and the commit it points at."""

    version: str
    commit: str


@dataclass(frozen=True)
class Event:
    """One line of the registry's history: a version registered, or assigned to a stage."""

    at: datetime
    event: str  # registration | assignment
    version: str
    stage: str | None
    commit: str
    message: str
    author: str = ""  # the tagger, name <email>
    record: dict | None = None  # the accountability record the tag carries (flows.ship.audit), if any


def _semver(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.removeprefix("v").split("."))
    except ValueError:
        return (-1,)


def _tags(root: Path, pattern: str) -> list[tuple[str, str]]:
    """(tag, commit it points at) of the tags matching pattern; [] outside a git repo."""
    out = probe("for-each-ref", "--format=%(refname:short) %(*objectname) %(objectname)", f"refs/tags/{pattern}", cwd=root)
    rows = [line.split() for line in (out or "").splitlines() if line.strip()]
    return [(row[0], row[1] if len(row) == 3 else row[-1]) for row in rows]  # annotated tags: the peeled commit


def versions(root: Path) -> list[Version]:
    """Every registered version, newest (highest) first; [] when none or not a git repo."""
    found = [Version(tag.split("@", 1)[1], commit) for tag, commit in _tags(root, f"{ARTIFACT}@v*")]
    return sorted(found, key=lambda v: _semver(v.version), reverse=True)


def prod(root: Path) -> Version | None:
    """The version that is prod now: the one the highest-numbered `model#prod#N` tag points at (as DVC resolves it).

    Not GTO's stage query: after a rollback two versions carry a prod tag, and within the same
    second GTO's timestamps cannot tell which came last; the tag numbers can.
    """
    assigned = _tags(root, f"{ARTIFACT}#{PROD}#*")
    if not assigned:
        return None
    _, commit = max(assigned, key=lambda row: int(row[0].rsplit("#", 1)[-1]))
    return next((v for v in versions(root) if v.commit == commit), None)


def history(root: Path) -> list[Event]:
    """Registrations and prod assignments, newest first."""
    try:
        rows = gto_api().history(str(root), ARTIFACT)
    except Exception:  # noqa: BLE001 - no registry yet
        return []
    events = []
    for row in rows:
        if row["event"] in ("registration", "assignment"):
            summary, record = parse_message(row["message"] or "")
            events.append(Event(row["timestamp"], row["event"], row["version"], row["stage"], row["commit"], summary,
                                _who(row.get("author"), row.get("author_email")), record))
    return events


AUDIT_MARK = "tunedeck-audit: "  # the line of a tag message that holds its accountability record (flows.ship.audit)


def tag_message(summary: str, record: dict) -> str:
    """A tag message: the summary a person reads, then the record on its own line."""
    return f"{summary}\n\n{AUDIT_MARK}{json.dumps(record, sort_keys=True, default=str)}"


def parse_message(text: str) -> tuple[str, dict | None]:
    """(the summary, the record or None) of a tag message (one written before records: no record)."""
    summary, found = [], None
    for line in (text or "").splitlines():
        if line.startswith(AUDIT_MARK):
            try:
                found = json.loads(line[len(AUDIT_MARK):])
            except ValueError:
                found = None
        elif line.strip():
            summary.append(line.strip())
    return " ".join(summary), found


def _who(name: str | None, email: str | None) -> str:
    return f"{name or ''} <{email}>".strip() if email else (name or "")


def next_version(root: Path) -> str:
    """The version the next promotion gets: the highest registered one with its minor part bumped (v0.1.0 first)."""
    found = versions(root)
    if not found:
        return "v0.1.0"
    major, minor, *_ = (*_semver(found[0].version), 0, 0)
    return f"v{major}.{minor + 1}.0"


def register_prod(root: Path, commit: str, version: str, message: str) -> list[str]:
    """Register commit as version and make it prod; the tags created."""
    gto = gto_api()
    try:
        gto.register(str(root), ARTIFACT, commit, version=version, message=message)
        gto.assign(str(root), ARTIFACT, PROD, version=version, message=message)
    except Exception as exc:  # noqa: BLE001 - gto's errors are plain sentences already
        raise TunedeckError(f"GTO could not tag {commit[:12]} as {ARTIFACT} {version} in {root}: {exc}") from None
    return [f"{ARTIFACT}@{version}", _latest_prod_tag(root)]


def assign_prod(root: Path, version: str, message: str) -> str:
    """Make an earlier registered version prod again (a new tag; nothing is deleted); the tag created."""
    known = [v.version for v in versions(root)]
    if version not in known:
        listed = ", ".join(known) if known else "none yet"
        raise TunedeckError(f"model version '{version}' is not in the registry (registered: {listed}): pick one of those.")
    current = prod(root)
    if current is not None and current.version == version:
        raise TunedeckError(f"{version} is already prod: nothing to roll back.")
    # force: GTO keeps every earlier assignment, so v0.1.0 still counts as "in prod" by its old tag
    gto_api().assign(str(root), ARTIFACT, PROD, version=version, message=message, force=True)
    return _latest_prod_tag(root)


def _latest_prod_tag(root: Path) -> str:
    tags = (probe("tag", "--list", f"{ARTIFACT}#{PROD}#*", cwd=root) or "").split()
    return max(tags, key=lambda t: int(t.rsplit("#", 1)[-1]), default="")


class ModelUnavailable(TunedeckError):
    """A registered version's model file could not be had from this clone's DVC cache or remote."""


def fetch(root: Path, out: Path, stage: str | None = None, version: str | None = None) -> Path:
    """The model file of a stage or version, through `dvc artifacts get` (DVC's cache, else its remote)."""
    which = ["--stage", stage] if stage else ["--rev", version] if version else []
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        dvc("artifacts", "get", ".", ARTIFACT, *which, "-o", str(out), "--force", cwd=root)
    except TunedeckError as exc:
        raise ModelUnavailable(unavailable(root, stage, version, str(exc))) from None
    return out


def unavailable(root: Path, stage: str | None, version: str | None, dvc_error: str) -> str:
    """One sentence for a model file DVC could not get: which version, which remote, and what to do.

    DVC's own two lines name neither the version nor the remote, and say nothing a new colleague
    (whose clone has the registry's tags but not its models) can act on.
    """
    found = prod(root) if stage == PROD else next((v for v in versions(root) if v.version == version), None)
    what = f"{ARTIFACT} {found.version} (commit {found.commit[:12]}{', prod' if stage == PROD else ''})" if found else \
        f"{ARTIFACT} {version or stage}"
    name, url = default_remote(root)
    if not name:
        return (f"{what} is not in this clone's DVC cache and the clone has no default DVC remote to get it from: "
                "add the team's with `dvc remote add -d NAME URL`.")
    low = dvc_error.lower()
    if any(sign in low for sign in (*AUTH_SIGNS, *REACH_SIGNS)):
        why = f"could not be fetched from DVC remote '{name}' ({url}) ({dvc_error.split(': ', 1)[-1][:200]})"
    else:
        why = f"is in neither this clone's DVC cache nor its DVC remote '{name}' ({url})"
    return (f"{what} {why}: `dvc push` it from a clone that has it, or point '{name}' at the storage that does "
            f"(`dvc remote modify {name} url URL`).")


def push_tags(root: Path, tags: list[str]) -> str | None:
    """Push the tags to the clone's origin, when it has one; why not, or None when pushed (or no origin)."""
    remotes = (probe("remote", cwd=root) or "").split()
    if "origin" not in remotes or not tags:
        return None
    try:
        return failure("push", "origin", *tags, cwd=root, timeout=120)
    except TunedeckError as exc:  # git push hung past its 120 s: said, the tags stay here
        return str(exc)
