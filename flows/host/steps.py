"""Prefect pull steps: where a deployment's run finds the code, on the worker's own host.

`prefect deploy` resolves `{{ $VAR }}` when it deploys, on the machine that deploys, so a folder
written in prefect.yaml would be the deploying host's. `checkout` decides at run time instead:
the project folder of the worker that picked the run up (`tunedeck worker` hands its runs the
project setting), and, on a worker started with `--git-pull`, the latest commit of its branch.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from pathlib import Path

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.gateways.git import failure, git


def checkout(directory: str | None = None) -> dict[str, str]:
    """Enter the worker's project folder (else `directory`); `git pull --ff-only` there if asked.

    It runs first in every deployment run's process, so it also arms that process's stack dump:
    `kill -USR1 PID` (and `tunedeck worker` as it stops a run) writes where each of its threads
    is to the worker's log, the one way to see a run that hangs without a word.
    """
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    settings = Settings.read()  # the run's process starts here
    folder = Path(settings.project or directory or ".").resolve()
    if not (folder / "dvc.yaml").is_file():
        raise TunedeckError(
            f"{folder} is not a tunedeck project (no dvc.yaml): start `tunedeck worker` from the project's folder."
        )
    os.chdir(folder)
    result = {"directory": str(folder)}
    if settings.git_pull:
        why = failure("pull", "--ff-only", "--quiet", cwd=folder, timeout=300)
        if why:
            raise TunedeckError(
                f"`git pull --ff-only` in {folder} failed ({why}): commit or drop local changes there, "
                "or check that the host reaches the git server."
            )
        result["commit"] = git("rev-parse", "HEAD", cwd=folder).strip()
        print(f"code: {folder} at {result['commit'][:12]}", flush=True)
    return result
