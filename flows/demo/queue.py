"""DVC's experiment queue, as the demo uses it: queue named experiments, run them, read them back.

Each queued experiment runs in a workspace of its own (under .dvc/tmp/exps, DVC's temp
executor), so experiments that run at the same time never share params.yaml or outputs, and
the project's own workspace is left as it was. Results come back as DVC experiments: what
`dvc exp show` lists.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flows.core.errors import TunedeckError
from flows.gateways.dvc.cli import dvc_bin


@dataclass(frozen=True)
class Queued:
    """One experiment to queue: its name, `-S` overrides and `-C` paths (what git does not hold)."""

    name: str
    overrides: list[str]
    copy_paths: list[str] = field(default_factory=list)


def child_env(**extra: str) -> dict[str, str]:
    """Environment for dvc and the stages: this venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # the demo's experiments live on this host and in DVC's temporary queue workspaces: copying each
    # epoch's checkpoint to a DVC remote would only cost them time
    env.setdefault("TUNEDECK_CHECKPOINT_REMOTE", "off")
    env.update(extra)
    return env


def dvc(*args: str, quiet: bool = False, check: bool = True) -> None:
    """Run one dvc command with list arguments; its output is shown indented, failure is an error (with check)."""
    proc = subprocess.Popen([dvc_bin(), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not quiet and "No file hash info found" not in line:
            print(f"    {line}", end="", flush=True)
    if proc.wait() != 0 and check:
        tail = "".join(lines[-5:]).strip()
        raise TunedeckError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}): {tail[-400:]}")


def queue(experiments: list[Queued]) -> None:
    """`dvc exp run --queue -n NAME -S ... -C ...` for each, through DVC's Python API in this one process.

    An earlier experiment of the same name is removed first. (A `dvc` command per experiment
    costs 1.6 s of start-up each.)
    """
    from dvc.repo import Repo

    subprocess.run([dvc_bin(), "exp", "remove", *(e.name for e in experiments)], capture_output=True, env=child_env())
    with Repo(".") as repo:
        for exp in experiments:
            try:
                repo.experiments.run(targets=["evaluate"], queue=True, name=exp.name, params=exp.overrides,
                                         copy_paths=exp.copy_paths)  # up to evaluate: the demo compares test accuracy; export is for shipping
            except Exception as exc:  # noqa: BLE001 - DVC's errors vary; say which experiment
                raise TunedeckError(f"DVC could not queue the experiment {exp.name}: {exc}") from None


def run_queued(jobs: int, env: dict[str, str]) -> None:
    """`dvc exp run --run-all --jobs N` to its end: each experiment's start is shown, a failure is one sentence."""
    proc = subprocess.Popen([dvc_bin(), "exp", "run", "--run-all", "--jobs", str(jobs)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    for line in proc.stdout:
        tail = [*tail[-4:], line]
        if line.startswith(("Reproducing experiment", "ERROR")):
            print(f"    {line}", end="", flush=True)
    if proc.wait() != 0:
        raise TunedeckError(f"DVC's queue failed to run the experiments: {''.join(tail).strip()[-300:]} "
                            "(`dvc queue logs <name>` has each one's output).")


def results(names: list[str]) -> dict[str, dict]:
    """name -> that experiment's row of `dvc exp show` (params, metrics, its commit as 'rev'); a failed one is an error."""
    import dvc.api

    rows = {row["Experiment"]: row for row in dvc.api.exp_show() if row.get("Experiment")}
    for name in names:
        state = rows[name].get("State") if name in rows else "missing"
        if state not in (None, "Success"):
            raise TunedeckError(f"the experiment {name} did not succeed ({state}): `dvc queue logs {name}` says why.")
    return {name: rows[name] for name in names}


def metric(row: dict, name: str, path: str = "eval/metrics.json") -> float:
    """One metric of an experiment's row (`dvc exp show` names a column by its file only when two files share it)."""
    for key in (name, f"{path}:{name}"):
        if isinstance(row.get(key), float):
            return row[key]
    raise TunedeckError(f"the experiment {row.get('Experiment')} has no '{name}' in {path}.")


