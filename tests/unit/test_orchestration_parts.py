"""Pure parts of the deployment layer: overrides, GPU slots, the demo's options, the warm server's SIGTERM."""

from __future__ import annotations

import os

import pytest

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.gateways.gpus import GpuState, cpu_slot_name, gpu_states, slot_name
from flows.run.overrides import apply_overrides, parse_overrides
from tests.conftest import ROOT


def test_overrides_are_checked_and_keep_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    original = apply_overrides(params, ["train.lr=0.01", "model.pretrained=false"])
    text = params.read_text()
    assert "lr: 0.01" in text and "pretrained: false" in text and "# tunedeck params" in text
    assert original == (ROOT / "params.yaml").read_text()


@pytest.mark.parametrize(
    "items, message",
    [
        (["train.lrr=0.1"], "unknown key 'train.lrr'"),
        (["train.lr=-1"], "train.lr must be greater than 0"),
        (["trainlr"], "is not key=value"),
        (["nogroup.x=1"], "'nogroup' is not a params group"),
    ],
)
def test_bad_overrides_are_one_sentence_and_change_nothing(tmp_path, items, message):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    with pytest.raises(TunedeckError, match=message.replace(".", r"\.")):
        apply_overrides(params, items)
    assert params.read_text() == (ROOT / "params.yaml").read_text()


def test_override_values_read_as_yaml():
    assert parse_overrides(["a.b=3", "a.c=null", "a.d=cosine"]) == {"a.b": 3, "a.c": None, "a.d": "cosine"}


def test_gpu_slots_and_stand_in_gpus():
    from flows.gateways import gpus

    gpus.use(gpus.StandInNvml(2))
    try:
        assert [g.index for g in gpu_states()] == [0, 1]
    finally:
        gpus.reset()
    assert gpus.host("box1") == "box1" and gpus.host("") == gpus.socket.gethostname()
    assert slot_name(1, "box1") == "tunedeck-box1-gpu1" and slot_name(None, "box1") == "tunedeck-box1-cpu"
    assert [cpu_slot_name(i, "box1") for i in range(3)] == ["tunedeck-box1-cpu", "tunedeck-box1-cpu1", "tunedeck-box1-cpu2"], \
        "a worker with one CPU slot keeps the slot name workers had before --cpu-slots"
    assert GpuState(0, 0.05, 3).free and not GpuState(0, 0.5, 0).free and not GpuState(0, 0.0, 90).free


def test_data_changes_are_read_from_dvc_status():
    from flows.run.data_watch import data_changed

    status = {"prepare": [{"changed deps": {"data/images": "modified", "flows/core/images.py": "modified"}},
                          {"changed outs": {"data/prepared": "deleted"}}]}
    assert data_changed(status) == ["data/images"]
    assert data_changed({}) == []


@pytest.mark.parametrize("gpus, cpu_slots", [(None, 0), (None, -1), ("0", 2)])
def test_bad_cpu_slots_are_one_sentence_before_any_server_is_asked(gpus, cpu_slots):
    from flows.host.deploy import worker_command

    with pytest.raises(TunedeckError, match=f"--cpu-slots {cpu_slots}: give 1 or more, and only on a worker without --gpus"):
        worker_command(Settings(), "local", gpus, root=ROOT, cpu_slots=cpu_slots)


@pytest.mark.parametrize("args", [["--seeds", "1"], ["--jobs", "0"], ["--source-epochs", "0"]])
def test_bad_demo_options_are_one_sentence_and_exit_2_before_anything_starts(args, capsys, monkeypatch):
    from cli.main import main

    monkeypatch.setattr("flows.demo.run.run_demo", lambda *a: pytest.fail("the demo started"))
    assert main(["demo", *args]) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("tunedeck: error: --seeds must be 2 or more"), said


def test_the_warm_servers_sigterm_ends_the_server_at_once_but_never_a_child_forked_a_moment_ago(tmp_path):
    """The server goes with os._exit, its socket removed; a child that still has the handler (a SIGTERM between
    its fork and its taking the default back) ends as a child, and the server's socket stays."""
    import signal
    import subprocess
    import sys

    from flows.stages.warm import stop_handler

    sock = tmp_path / "warm.sock"
    sock.write_text("")
    as_child = stop_handler(str(sock), server=os.getpid() + 1)  # this process is not the server: as in a child
    with pytest.raises(SystemExit):
        as_child(signal.SIGTERM, None)
    assert sock.exists(), "a child's SIGTERM removed the server's socket"
    server = subprocess.run([sys.executable, "-c", "import os, signal; from flows.stages.warm import stop_handler; "
                             f"stop_handler({str(sock)!r}, os.getpid())(signal.SIGTERM, None); print('went on')"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (server.returncode, server.stdout) == (0, "") and not sock.exists(), server


def test_the_rendezvous_port_is_free_and_outside_the_ephemeral_range_that_outgoing_connections_take():
    import socket

    from flows.run.multinode import EPHEMERAL, free_port

    low, high = (int(v) for v in EPHEMERAL.read_text().split())
    ports = {free_port("127.0.0.1") for _ in range(20)}
    assert all(max(1024, low - 10_000) <= p < low for p in ports), ports
    port = ports.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free: nothing held it
