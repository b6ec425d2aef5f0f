"""The demo's experiments as the runs a deployment makes: a deployment, a worker on this host, and their ends.

The deployment `experiment/demo` (flows.run.pipeline's `experiment` flow, the one behind
prefect.yaml's `train`) goes to a work pool of its own, `demo`, so a worker of the user's on
`local` never picks a demo run up, nor the demo's worker one of theirs. The demo starts
`tunedeck worker --pool demo --cpu-slots J` in this clone: J runs at once, each on its share of
the cores, each in a workspace of its own (a git worktree; its overrides go to that
workspace's params.yaml, never to the clone's), each saved as the DVC experiment of its name.
The worker's log is .tunedeck/demo-worker.log; the worker stops with the demo (even a killed one).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.gateways import prefect_api, processes
from flows.host.deploy import deploy_flow, ensure_pool

POOL = "demo"
DEPLOYMENT = "experiment/demo"
ENTRYPOINT = "flows/run/pipeline.py:experiment"
LOG = Path(".tunedeck") / "demo-worker.log"


@dataclass(frozen=True)
class Planned:
    """One experiment of the demo: its name (the flow run's and the DVC experiment's) and its overrides."""

    name: str
    overrides: list[str] = field(default_factory=list)


class DemoRuns:
    """`with DemoRuns(root, url, jobs) as runs:` the deployment and a worker of `jobs` CPU slots; start() and wait()."""

    POLL_S = 1.0

    def __init__(self, root: Path, url: str, jobs: int, settings: Settings) -> None:
        self.root, self.url, self.jobs, self.settings = root.resolve(), url, jobs, settings
        self.worker: processes.Helper | None = None
        self.names: dict[str, str] = {}  # run id -> experiment name

    def __enter__(self) -> DemoRuns:
        with contextlib.ExitStack() as stack:
            stack.enter_context(prefect_api.using(self.url))  # the server the demo started after Prefect was imported
            stack.callback(self.stop)  # runs first on the way out
            ensure_pool(POOL)
            self.worker = self._start_worker()  # it starts while the deployment is made
            deploy_flow(self.root, ENTRYPOINT, DEPLOYMENT.split("/")[1], POOL)
            self._exit = stack.pop_all()  # set up: kept until __exit__
        return self

    def __exit__(self, *exc) -> None:
        self._exit.close()

    def _start_worker(self) -> processes.Helper:
        exe = Path(sys.executable).parent / "tunedeck"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.main"]
        (self.root / LOG).parent.mkdir(parents=True, exist_ok=True)  # a server of PREFECT_API_URL made no .tunedeck/
        log = (self.root / LOG).open("w")
        # the demo's runs live on this host: copying each epoch's checkpoint to a DVC remote would only cost time
        remote = False if self.settings.checkpoint_remote is None else self.settings.checkpoint_remote
        env = {**self.settings.but(checkpoint_remote=remote).environ(), "PREFECT_API_URL": self.url,
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        try:
            return processes.spawn([*cmd, "worker", "--pool", POOL, "--cpu-slots", str(self.jobs)], tie=True,
                                   cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def start(self, planned: Planned) -> str:
        """A run of the demo's deployment for one experiment; its flow run id."""
        run_id = prefect_api.start_deployment_run(
            DEPLOYMENT, {"overrides": planned.overrides, "name": planned.name, "until": "evaluate"}, name=planned.name)
        self.names[run_id] = planned.name  # up to evaluate: the demo compares test accuracy; export is for shipping
        return run_id

    def wait(self, run_ids: list[str], on_end: Callable[[str], list[str]] | None = None) -> None:
        """Until every run is final, each end printed as it comes, with the time it ran; on_end(run_id) may start
        more runs (it returns their ids: waited for too). A run that did not complete is one sentence."""
        left = set(run_ids)
        while left:
            if self.worker is not None and self.worker.poll() is not None:
                raise TunedeckError(f"the demo's worker stopped (exit {self.worker.returncode}) before its runs ended: "
                                    f"{self.root / LOG} says why.")
            for run_id, state in prefect_api.run_states(sorted(left)).items():
                if not state.final:
                    continue
                left.discard(run_id)
                print(f"    {self.names[run_id]}: {state.name} ({state.seconds:.0f} s)", flush=True)
                if state.kind != "COMPLETED":
                    raise TunedeckError(
                        f"the demo's run {self.names[run_id]} ended {state.name} ({state.message.strip()[:200] or 'no message'}): "
                        f"`prefect flow-run logs {run_id}` has its log, {self.root / LOG} the worker's.")
                if on_end is not None:
                    left.update(on_end(run_id))
            if left:
                time.sleep(self.POLL_S)

    def stop(self) -> None:
        """The worker and whatever it still runs (its SIGTERM stops the family: flows.host.worker)."""
        if self.worker is not None:
            self.worker.stop(grace_s=30)
