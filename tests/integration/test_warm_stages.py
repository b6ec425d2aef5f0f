"""Warm stages (flows.stages.warm): the same outputs, exit statuses and sentences as a plain stage process,
and no stage left running when its stand-in is killed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.integration.project import checkpoint_written, env, make_project, run

pytestmark = pytest.mark.slow
HANG_S = 300  # a hang guard on every wait below, not a limit the test asserts: each event comes in well under a
# second to a few seconds on a quiet machine (bench/responsiveness.py measures them), but a first checkpoint took
# over 60 s beside another xdist worker's training at a load near 30 (CI on 5110b57)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project, prepared and trained once, so any test may run first (evaluate needs a model)."""
    project = make_project(tmp_path_factory.mktemp("warm"))
    run(project, "python", "-m", "flows.stages.prepare", TUNEDECK_PREFECT="off")
    run(project, "python", "-m", "flows.stages.train", TUNEDECK_PREFECT="off")
    return project


@pytest.fixture(scope="module")
def warm(project):
    """A warm server, as a pipeline run starts one (its socket in a temporary folder)."""
    from flows.stages.warm import WarmStages

    server = WarmStages().start()
    deadline = time.monotonic() + HANG_S  # a hang guard
    while not server.path.exists():
        assert time.monotonic() < deadline and server.proc.poll() is None, "the warm server did not start"
        time.sleep(0.05)
    yield server
    server.stop()
    assert server.proc.poll() is not None and not server.path.exists()


def stage(project, name: str, warm=None, **extra):
    more = {"TUNEDECK_PREFECT": "off", **(warm.env() if warm else {}), **extra}
    return run(project, "python", "-m", f"flows.stages.{name}", check=False, **more)


def children_of(server) -> list[psutil.Process]:
    """The server's live children (one that ended is reaped within half a second)."""
    return [p for p in psutil.Process(server.proc.pid).children() if p.status() != psutil.STATUS_ZOMBIE]


def test_a_warm_stage_writes_what_a_plain_one_writes_and_says_the_same(project, warm):
    plain = stage(project, "train")
    assert plain.returncode == 0, plain.stderr
    model = (project / "models" / "model.safetensors").read_bytes()
    (project / "models" / "model.safetensors").unlink()
    hot = stage(project, "train", warm, TUNEDECK_CHECKPOINTS=str(project / "other-checkpoints"))  # no resume from plain's
    assert hot.returncode == 0, hot.stderr
    assert (project / "models" / "model.safetensors").read_bytes() == model, "the warm stage trained other weights"
    assert "train done:" in hot.stderr and "train done:" in plain.stderr
    evaluate = stage(project, "evaluate", warm)
    assert evaluate.returncode == 0 and "evaluate done: accuracy=" in evaluate.stderr, evaluate.stderr
    assert json.loads((project / "eval" / "metrics.json").read_text())["accuracy"] >= 0
    assert not children_of(warm), "a finished stage's child is still there"


def test_a_bad_param_is_the_same_one_sentence_and_exit_2(project, warm):
    params = (project / "params.yaml").read_text()
    raw = yaml.safe_load(params)
    raw["train"]["lr"] = 0
    try:
        (project / "params.yaml").write_text(yaml.safe_dump(raw))
        hot, plain = stage(project, "train", warm), stage(project, "train")
    finally:
        (project / "params.yaml").write_text(params)
    assert hot.returncode == plain.returncode == 2
    said = [line for line in hot.stderr.splitlines() if "error:" in line]
    assert said == [line for line in plain.stderr.splitlines() if "error:" in line], hot.stderr
    assert len(said) == 1 and "train.lr must be greater than 0" in said[0]
    assert "Traceback" not in hot.stderr


@pytest.fixture
def long_train(project, warm, tmp_path):
    """Starts a train stage of 5,000 epochs (long_params) through the warm server, from scratch: its checkpoints in
    a folder of its own (no resume from another test's), so the first one written says it is training. Its stderr
    goes to a file (a pipe nobody reads fills and stops the stage). Whatever the test's end, the stage and its warm
    child are killed after it: one left behind trains for the rest of the suite (CI on 5110b57)."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        before = {p.pid for p in psutil.Process(warm.proc.pid).children()}  # an earlier test's, still being reaped
        err = (tmp_path / f"stage-{len(started)}.err").open("w")
        proc = subprocess.Popen(
            ["python", "-m", "flows.stages.train"], cwd=project, stdout=subprocess.DEVNULL, stderr=err, text=True,
            env=env(TUNEDECK_PREFECT="off", TUNEDECK_PROGRESS="lines", TUNEDECK_CHECKPOINTS=str(tmp_path), **warm.env()),
        )
        proc.said = lambda: Path(err.name).read_text()  # type: ignore[attr-defined]
        proc.before = before  # type: ignore[attr-defined]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    psutil.wait_procs([*children_of(warm)], timeout=HANG_S)  # the stand-in's death ends its child (a test below)
    for kid in children_of(warm):
        with contextlib.suppress(psutil.NoSuchProcess):
            kid.kill()


def wait_until(done, proc, what: str):
    """done()'s first true value (evaluated once per look: a second look may see another world)."""
    deadline = time.monotonic() + HANG_S  # a hang guard
    while not (found := done()):
        assert proc.poll() is None, f"the stage ended ({proc.returncode}) before {what}: {proc.said()}"
        assert time.monotonic() < deadline, f"no {what} after {HANG_S} s: {proc.said()}"
        time.sleep(0.02)
    return found


def forks_of(warm, proc, live: bool = True) -> list[psutil.Process]:
    """The server's forks started since proc's start: its children that run the server's own command line (a helper
    process the server's imports may start is not a stage's child: CI on 1c1663b found one and lost it again)."""
    server = psutil.Process(warm.proc.pid)
    mine = []
    for kid in server.children():
        with contextlib.suppress(psutil.Error):
            if kid.pid not in proc.before and kid.cmdline() == server.cmdline():
                if not live or kid.status() != psutil.STATUS_ZOMBIE:
                    mine.append(kid)
    return mine


def wait_for_child(warm, proc) -> psutil.Process:
    return wait_until(lambda: forks_of(warm, proc), proc, "its warm child")[0]


def wait_for_training(checkpoints: Path, proc) -> None:
    """Until the stage's first checkpoint is on disk: its child is past start-up, in the training loop."""
    wait_until(lambda: checkpoint_written(checkpoints), proc, "first checkpoint")


@pytest.fixture
def long_params(project):
    params = (project / "params.yaml").read_text()
    raw = yaml.safe_load(params)
    raw["train"]["epochs"] = 5000
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    yield
    (project / "params.yaml").write_text(params)


def test_killing_the_stage_process_stops_its_warm_child(warm, long_params, long_train, tmp_path):
    proc = long_train()
    child = wait_for_child(warm, proc)
    wait_for_training(tmp_path, proc)
    os.kill(proc.pid, signal.SIGKILL)  # as `kill -9` of the stage DVC started
    proc.wait()
    gone, alive = psutil.wait_procs([child], timeout=HANG_S)  # a hang guard
    assert not alive, f"the warm child {child.pid} outlived its stage process"


def test_sigterm_reaches_the_child_and_its_status_comes_back(warm, long_params, long_train, tmp_path):
    proc = long_train()
    wait_for_child(warm, proc)
    wait_for_training(tmp_path, proc)
    proc.terminate()
    assert proc.wait(timeout=HANG_S) != 0  # a hang guard


def test_a_child_killed_outright_gives_its_stage_process_137(warm, long_params, long_train):
    proc = long_train()
    child = wait_for_child(warm, proc)
    child.kill()
    assert proc.wait(timeout=HANG_S) == 128 + signal.SIGKILL  # a hang guard


def test_without_a_server_the_stage_runs_in_its_own_process(project, tmp_path):
    proc = stage(project, "evaluate", None, TUNEDECK_WARM=str(tmp_path / "nobody.sock"))
    assert proc.returncode == 0 and "evaluate done:" in proc.stderr, proc.stderr


def test_a_live_server_that_refuses_a_request_keeps_its_socket(tmp_path):
    """A server listening at the project's socket that refuses this request (another Python, another user) is left
    alone: the command runs in its own process, and the socket is neither removed nor taken by a new server."""
    import socket
    import threading

    from flows.stages.warm import delegate, start_project_server

    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(path))
        listening.listen()

        def refuse() -> None:  # as the server does with a request it will not serve: it closes the connection
            for _ in range(2):
                listening.accept()[0].close()

        refusing = threading.Thread(target=refuse, daemon=True)
        refusing.start()
        assert delegate(str(path), module="flows.stages.evaluate") is None
        assert start_project_server(path) is False
        refusing.join(timeout=HANG_S)  # a hang guard
        assert path.exists() and not refusing.is_alive()


def test_a_child_killed_before_it_says_hello_still_ends_its_stage_process(warm, long_params, long_train):
    """Killed right after the fork: the stand-in gets 137 from the server, and must not run the stage itself."""
    proc = long_train()
    deadline = time.monotonic() + HANG_S  # a hang guard
    while not (kids := forks_of(warm, proc, live=False)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.said()
        time.sleep(0.005)
    kids[0].kill()  # this stage's child (killing the earlier one let this one train on: CI on 71a8b15)
    assert proc.wait(timeout=HANG_S) == 128 + signal.SIGKILL  # a hang guard


def test_a_plain_dvc_repro_and_tunedeck_commands_fork_from_the_projects_own_server_and_kill_9_ends_a_stage_at_once(
        tmp_path):
    """No pipeline run: the first torch stage of a `dvc repro` starts the project's warm server (detached, for the
    next stages and the next repro), the stages after it fork from it, so do `tunedeck` commands that import torch,
    with the same output and exit status as in their own process, and a kill -9 of a `dvc repro`'s process group
    ends the stage's child at once, as it would end a stage in its own process. A warm stage's outputs are a plain
    one's: test_a_warm_stage_writes_what_a_plain_one_writes_and_says_the_same."""
    from flows.stages.warm import project_socket

    project = make_project(tmp_path / "by-hand")
    socket_path = project_socket(project, env(TUNEDECK_PREFECT="off"))
    run(project, "dvc", "repro", TUNEDECK_PREFECT="off")
    assert (project / "export" / "model.onnx").is_file()
    servers = [p for p in psutil.process_iter(["cmdline"]) if str(socket_path) in (p.info["cmdline"] or [])]
    assert len(servers) == 1 and socket_path.exists(), "one warm server of the project's own, still listening"
    assert socket_path.stat().st_mode & 0o077 == 0, "whoever may connect runs code as this user: the owner alone"
    server = servers[0]
    try:
        run(project, "tunedeck", "promote", TUNEDECK_PREFECT="off")
        served = sum(server.cpu_times()[2:4])  # the CPU time of the server's children, once each is reaped
        said = {}
        for mode in ("", "off"):
            out = tmp_path / "labels.csv"
            good = run(project, "tunedeck", "predict", "--input", "data/tiny", "--out", str(out), TUNEDECK_WARM=mode)
            bad = run(project, "tunedeck", "predict", "--input", "nowhere", "--out", str(out), check=False, TUNEDECK_WARM=mode)
            said[mode] = re.sub(r" in [\d.]+ s ", " ", good.stdout), out.read_text(), bad.returncode, bad.stderr
            if mode == "":
                assert sum(server.cpu_times()[2:4]) > served, "the commands did not run as forks of the project's server"
        assert said[""] == said["off"] and said[""][2] == 2 and "does not exist" in said[""][3], said
        raw = yaml.safe_load((project / "params.yaml").read_text())
        raw["train"]["epochs"] = 5000
        (project / "params.yaml").write_text(yaml.safe_dump(raw))
        err = (tmp_path / "repro.err").open("w")
        proc = subprocess.Popen(["dvc", "repro", "train"], cwd=project, stdout=subprocess.DEVNULL, stderr=err,
                                env=env(TUNEDECK_PREFECT="off", TUNEDECK_CHECKPOINTS=str(tmp_path / "ckpt")),
                                start_new_session=True)
        proc.said = lambda: Path(err.name).read_text()  # type: ignore[attr-defined]
        child = wait_until(lambda: [k for k in server.children() if k.status() != psutil.STATUS_ZOMBIE], proc,
                           "the train stage forked from the project's server")[0]
        wait_for_training(tmp_path / "ckpt", proc)
        os.killpg(proc.pid, signal.SIGKILL)  # as a terminal's kill of the whole `dvc repro`
        proc.wait()
        gone, alive = psutil.wait_procs([child], timeout=HANG_S)  # a hang guard: it dies at once, not after a grace
        assert not alive, f"the warm child {child.pid} outlived its `dvc repro`"
        assert server.is_running(), "the server stays for the next repro"
    finally:
        with contextlib.suppress(psutil.Error):
            server.terminate()
