"""An epoch's progress crosses three processes from rank 0 to the Prefect server: the training process writes its
marked line into a pipe that the run's own process reads, and that process sets the run's labels on the server
(docs/design.md draws it). Proven on the pipe itself: at the moment a progress line arrives, every process
holding the pipe's read end is the run's process, and the training process holds its write end (no relay between).
"""

from __future__ import annotations

import contextlib
import os
import time

import psutil
import pytest

from flows.contracts import StageProgress
from flows.gateways.dvc.session import DvcSession
from flows.stages.warm import WarmStages
from tests.integration.project import env, make_project, run

pytestmark = pytest.mark.slow
HANG_S = 300  # a hang guard on the warm server's start, not a limit the test asserts


def holders(pipe: str) -> dict[str, set[int]]:
    """The pids holding pipe ('pipe:[inode]'), by the end they hold ('read' or 'write', from each fd's flags)."""
    ends: dict[str, set[int]] = {"read": set(), "write": set()}
    for pid in psutil.pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # a process that ended while we looked, or one we may not read
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != pipe:
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                    flags = int(next(line for line in info if line.startswith("flags:")).split()[1], 8)
            except OSError:
                continue  # an fd closed while we looked (listdir's own, here)
            ends["read" if flags & 3 == os.O_RDONLY else "write"].add(pid)
    return ends


@pytest.mark.parametrize("warm", [True, False], ids=["warm stage", "plain stage"])
def test_an_epochs_progress_goes_from_the_training_process_straight_into_the_runs_process(tmp_path, warm):
    project = make_project(tmp_path)
    run(project, "python", "-m", "flows.stages.prepare", TUNEDECK_PREFECT="off")
    seen: list[tuple[dict[str, set[int]], set[int]]] = []
    with WarmStages() if warm else contextlib.nullcontext() as server, DvcSession(cwd=project) as session:
        deadline = time.monotonic() + HANG_S  # a hang guard: a stage that finds no server yet runs by itself
        while warm and not server.path.exists():
            assert time.monotonic() < deadline and server.proc.poll() is None, "the warm server did not start"
            time.sleep(0.05)
        pipe = os.readlink(f"/proc/self/fd/{session._proc.stdout.fileno()}")
        helper = session._proc.pid

        def on_line(text: str) -> None:
            if StageProgress.from_line(text) is not None and not seen:
                trainers = {p.pid for p in psutil.Process(helper).children(recursive=True)
                            if "flows.stages.train" in " ".join(p.cmdline())}
                if warm:  # the stage's stand-in hands its stdout to a child of the warm server, which trains
                    trainers = {p.pid for p in psutil.Process(server.proc.pid).children()}
                seen.append((holders(pipe), trainers))

        stage_env = env(TUNEDECK_PREFECT="off", TUNEDECK_PROGRESS="lines", TUNEDECK_CHECKPOINTS=str(tmp_path / "ck"),
                        **(server.env() if warm else {}))
        session.repro("train", stage_env, on_line=on_line)
    assert seen, "no progress line came"
    ends, trainers = seen[0]
    assert ends["read"] == {os.getpid()}, f"another process reads the progress before the run's: {ends}"
    assert trainers and trainers <= ends["write"], f"the training process {trainers} does not write the pipe: {ends}"
