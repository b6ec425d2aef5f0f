"""Who let this model into production, when, on what evidence: the registry's accountability records.

Every gate verdict (promoted or rejected) and every rollback carries one record: who (the git
identity git would tag with, and the Prefect flow run and deployment when one ran it), when, why (the gate's summary;
promotion.json holds its figures), and the exact data (DVC's md5 of the data folder the model was
trained on), code commit and params (their sha256 and the resolved values). A rejection's record
is in its promotion.json (kept with the run's experiment); a promotion's and a rollback's also ride
in the GTO tag's message, so they travel with the tags (`git push --tags`) and `tunedeck registry
--audit vX` prints a version's whole chain from any clone.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from flows.gateways.git import probe
from flows.ship import registry


def record(root: Path, why: str, data_md5: str | None, params: dict) -> dict:
    """The accountability record of an action taken now in root."""
    from flows.gateways import prefect_api

    ident = (probe("var", "GIT_COMMITTER_IDENT", cwd=root) or "").strip()  # as git tags it: env, then config
    who = ident.rsplit(">", 1)[0] + ">" if ">" in ident else "unknown"
    run = prefect_api.current_run() or {}
    canonical = json.dumps(params, sort_keys=True, default=str)
    return {"who": who, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "why": why, "flow_run": run.get("flow_run"), "flow_run_name": run.get("flow_run_name"),
            "deployment": run.get("deployment"), "code_commit": (probe("rev-parse", "HEAD", cwd=root) or "").strip() or None,
            "data_md5": data_md5, "params_sha256": hashlib.sha256(canonical.encode()).hexdigest(), "params": params}


def chain(root: Path, version: str) -> list[str]:
    """The version's history, oldest first: each registration and prod assignment with its record."""
    events = [e for e in reversed(registry.history(root)) if e.version == version]
    lines = []
    for e in events:
        what = "registered" if e.event == "registration" else f"made {e.stage}"
        summary, entry = e.message, e.record
        lines.append(f"{e.at:%Y-%m-%d %H:%M:%S}  {version} {what} by {e.author or 'unknown'}: {summary}")
        if entry:
            ran = (f"flow run {entry['flow_run_name']} ({entry['flow_run']}) of deployment {entry['deployment']}"
                   if entry.get("flow_run") else "by hand (no Prefect flow run)")
            lines.append(f"    {ran}; code {str(entry.get('code_commit') or '?')[:12]}, data {entry.get('data_md5')}, "
                         f"params sha256 {entry['params_sha256'][:16]}…")
        else:
            lines.append("    no accountability record (tagged before tunedeck kept them)")
    return lines
