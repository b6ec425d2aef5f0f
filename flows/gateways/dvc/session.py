"""One long-lived DVC process for all the stages of a pipeline run.

A `dvc` command costs about 0.45 s before it does anything (importing DVC); the pipeline flow
asks DVC two things per stage (is it up to date? reproduce it), so a process per question
made a three-stage run about 1.3 s slower than one plain `dvc repro`. The session starts one
helper (`python -m flows.gateways.dvc.session`), which imports DVC while the flow starts, then answers
each question in-process: the stage's command output streams back line by line, followed by
a marker line carrying the answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from flows.contracts import DvcAnswer, DvcRequest
from flows.core.errors import TunedeckError
from flows.gateways import processes
from flows.gateways.dvc.cli import output_tail

MARK = "\x1etunedeck-dvc-session "


class DvcSession:
    """The client side: `up_to_date_key(stage)` and `repro(stage, env, on_line)`."""

    def __init__(self, cwd: Path | None = None) -> None:
        self.cwd = cwd
        self.workdir: Path | None = None  # where questions are answered, when not where the helper started
        self._proc: processes.Helper | None = None
        self._lock = threading.Lock()

    def start(self) -> DvcSession:
        if self._proc is None or self._proc.poll() is not None:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
            # not tied: it ends when its stdin closes, after the stage it runs (a stopped run's stages are stopped
            # with the run's whole process tree: flows.host.worker, flows.stages.orchestration)
            self._proc = processes.spawn(
                [sys.executable, "-m", "flows.gateways.dvc.session"], tie=False, cwd=self.cwd, env=env, text=True,
                bufsize=1, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
        return self

    def _ask(self, request: DvcRequest, on_line: Callable[[str], None] | None, lines: list[str]) -> DvcAnswer:
        with self._lock:
            proc = self.start()._proc
            assert proc is not None and proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(request.model_dump_json() + "\n")
                proc.stdin.flush()
            except BrokenPipeError:
                pass  # it died: reading below says so
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                if line.startswith(MARK):
                    return DvcAnswer.model_validate_json(line[len(MARK):])
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            proc.wait()
            self._proc = None
            what = f"`dvc {' '.join(request.args)}`" if request.op == "dvc" else f"whether stage '{request.stage}' is up to date"
            raise TunedeckError(f"the DVC helper process exited (status {proc.returncode}) while asked {what}: "
                                f"{' | '.join(lines[-3:])[-300:]}")

    def up_to_date_key(self, stage: str) -> str | None:
        """A key made of the stage's dvc.lock entry when DVC says the stage is up to date, else None."""
        return self._ask(DvcRequest(op="key", stage=stage, cwd=self._where()), None, []).key

    def stage_order(self, target: str | None = None) -> list[str]:
        """The pipeline's stages, each after those it depends on: DVC's own stage graph (dvc.repo.Index.graph); with
        a target, only it and the stages it needs (what `dvc repro TARGET` runs)."""
        return self._ask(DvcRequest(op="stages", cwd=self._where(), stage=target), None, []).stages

    def repro(self, stage: str, env: dict[str, str] | None = None,
              on_line: Callable[[str], None] | None = None) -> None:
        """`dvc repro --single-item stage` with env added; its output goes to on_line."""
        self.run(["repro", "--single-item", stage], env, on_line)

    def run(self, args: list[str], env: dict[str, str] | None = None,
            on_line: Callable[[str], None] | None = None) -> None:
        """`dvc args` in the helper (DVC already imported: no second of start-up); a failure is one sentence."""
        lines: list[str] = []
        answer = self._ask(DvcRequest(op="dvc", args=args, env=env or {}, cwd=self._where()), on_line, lines)
        if answer.rc != 0:
            raise TunedeckError(f"`dvc {' '.join(args)}` failed (exit {answer.rc}): {output_tail(lines)}")

    def _where(self) -> str | None:
        return str(self.workdir) if self.workdir is not None else None

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.close(grace_s=30)

    def __enter__(self) -> DvcSession:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# --- the helper process ----------------------------------------------------------------------------


def stage_key(stage: str) -> str | None:
    """In the helper: the up-to-date key of a stage (None when it must run, or DVC cannot say)."""
    import yaml
    from dvc.repo import Repo

    try:
        with Repo(".") as repo:
            if repo.status(targets=[stage]):
                return None
    except Exception:  # noqa: BLE001 - an unknown status means: run it
        return None
    lock = yaml.safe_load(Path("dvc.lock").read_text()).get("stages", {}).get(stage)
    if lock is None:
        return None
    return f"dvc-{stage}-" + hashlib.sha256(json.dumps(lock, sort_keys=True).encode()).hexdigest()


def stage_order(target: str | None = None) -> list[str]:
    """In the helper: the pipeline stages of the repo here, dependencies first (DVC's graph, .dvc files left out);
    with a target, it and the stages it depends on, directly or not (an unknown target: none)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(".") as repo:
        graph = repo.index.graph  # an edge goes from a stage to a stage it depends on
        order = [s for s in reversed(list(nx.topological_sort(graph))) if isinstance(s, PipelineStage)]
        if target is not None:
            wanted = next((s for s in order if s.addressing == target), None)
            keep = {wanted, *nx.descendants(graph, wanted)} if wanted is not None else set()
            order = [s for s in order if s in keep]
        return [s.addressing for s in order]


def serve() -> None:
    from dvc.cli import main as dvc_main  # the one DVC import, done before the first question arrives

    base = dict(os.environ)
    for line in sys.stdin:
        request = DvcRequest.model_validate_json(line)
        if request.cwd:
            os.chdir(request.cwd)
        if request.op == "key":
            answer = DvcAnswer(key=stage_key(request.stage or ""))
        elif request.op == "stages":
            answer = DvcAnswer(stages=stage_order(request.stage))
        else:
            os.environ.clear()
            os.environ.update({**base, **request.env})
            answer = DvcAnswer(rc=dvc_main(request.args))
        sys.stderr.flush()
        sys.stdout.write(MARK + answer.model_dump_json() + "\n")
        sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the session is over and its run waits: no interpreter teardown of DVC's modules (0.1-0.2 s)


if __name__ == "__main__":
    serve()
