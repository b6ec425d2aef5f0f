"""Which flow run a process belongs to: its PREFECT__FLOW_RUN_ID, or the run file a stage wrote.

Processes started by a Prefect worker carry ``PREFECT__FLOW_RUN_ID`` in their environment;
stage processes started by a plain ``dvc repro`` do not, so each writes
``.tunedeck/runs/<pid>.json`` while it runs. A stage killed with SIGKILL leaves its file behind,
so a file only counts while its pid is alive. Parents are searched too (DDP workers are
children of the stage process).
"""

from __future__ import annotations

from pathlib import Path

import psutil

from flows.contracts import RunFile

ENV_KEY = "PREFECT__FLOW_RUN_ID"


class RunJoiner:
    """Maps a pid to a flow run id, caching per (pid, start time) since neither changes."""

    def __init__(self, runs_dir: Path | None = None, depth: int = 4) -> None:
        self.runs_dir = runs_dir or Path(".tunedeck") / "runs"
        self.depth = depth
        self._cache: dict[tuple[int, float], str | None] = {}

    def __call__(self, pid: int) -> str | None:
        """The flow run id of pid (or of its nearest parent that has one), else None."""
        try:
            proc = psutil.Process(pid)
            key = (pid, proc.create_time())
        except (psutil.Error, OSError):
            return None
        if key not in self._cache:
            self._cache[key] = self._find(proc)
        return self._cache[key]

    def _find(self, proc: psutil.Process) -> str | None:
        for _ in range(self.depth):
            found = self._from_file(proc.pid) or _from_environ(proc)
            if found:
                return found
            try:
                proc = proc.parent()
            except (psutil.Error, OSError):
                return None
            if proc is None or proc.pid <= 1:
                return None
        return None

    def _from_file(self, pid: int) -> str | None:
        path = self.runs_dir / f"{pid}.json"
        try:
            return RunFile.model_validate_json(path.read_text()).flow_run_id if psutil.pid_exists(pid) else None
        except (OSError, ValueError):
            return None


def _from_environ(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get(ENV_KEY) or None
    except (psutil.Error, OSError):
        return None
