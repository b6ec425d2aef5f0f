"""FedAvg through real Prefect workers on 127.0.0.1: 3 silos, each its own work pool and data folder.

Each silo's images are in a 0700 folder of its own user (uid 60001..60003); the silos' workers
run as root with its capabilities, so they read them. The coordinator's worker runs as root
*without any capability* (`setpriv --bounding-set=-all`): the kernel's permission checks then
apply to it as to any user, so it cannot read the silos' folders, and the coordinator flow checks
that itself before it starts (federated.unreadable). One silo's flow run is killed while it
starts its round: the round goes on with the other two, and the run ends Completed with a warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows.host import server
from tests.conftest import write_images
from tests.integration.project import api, env, free_port, make_project, run, wait
from tests.integration.test_deployments import logs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                       reason="needs root (to own folders as other users) and setpriv (to drop capabilities)"),
]
SILOS = ("a", "b", "c")
SILO_UID = 60001  # silo i's folder belongs to SILO_UID + i
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A tiny project, its server, 3 silo workers (each reads only its own folder) and a coordinator worker."""
    project = make_project(tmp_path_factory.mktemp("federated"))
    write_images(project / "data" / "eval", {"red": 6, "green": 6, "blue": 6}, size=16, seed=7)
    (project / "exchange").mkdir()
    private = tmp_path_factory.mktemp("silos")
    for i, name in enumerate(SILOS):
        folder = write_images(private / name, {"red": 6, "green": 6, "blue": 6}, size=16, seed=i)
        for path in [folder, *folder.rglob("*")]:
            os.lchown(path, SILO_UID + i, SILO_UID + i)
        folder.chmod(0o700)
    url = server.start(free_port(), root=project)
    workers: list[subprocess.Popen] = []
    try:
        run(project, "tunedeck", "federated", "deploy", *SILOS, PREFECT_API_URL=url)
        create_cpu_slot(url)  # before the workers: 4 workers creating it at once race (one gets 409 and exits)
        for name in SILOS:
            workers.append(subprocess.Popen(["tunedeck", "worker", "--pool", f"silo-{name}"], **quiet(project, name),
                                            env=env(PREFECT_API_URL=url, TUNEDECK_SILO_DATA=str(private / name))))
        workers.append(subprocess.Popen([*NO_CAPS, "tunedeck", "worker", "--pool", "local"], **quiet(project, "coordinator"),
                                        env=env(PREFECT_API_URL=url)))
        yield project, url, private
    finally:
        for proc in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        server.stop(root=project)


def quiet(project: Path, name: str) -> dict:
    """A worker's Popen arguments: its own session, its output in .tunedeck/worker-NAME.log (shown when a test fails)."""
    (project / ".tunedeck").mkdir(exist_ok=True)
    log = open(project / ".tunedeck" / f"worker-{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return {"stdout": log, "stderr": subprocess.STDOUT, "start_new_session": True, "cwd": project}


def create_cpu_slot(url: str) -> None:
    """This host's CPU slot (a global concurrency limit), which every `tunedeck worker` here creates if missing."""
    from flows.gateways.gpus import host, slot_name

    limits = {c["name"] for c in api(url, "v2/concurrency_limits/filter")}
    if slot_name(None, host()) not in limits:
        api(url, "v2/concurrency_limits/", {"name": slot_name(None, host()), "limit": 1})


def worker_logs(project: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((project / ".tunedeck").glob("worker-*.log")))


def logs_until(url: str, run_id: str, text: str, timeout: float = 60) -> str:
    """The run's log, once it has a line with text (or after timeout, a hang guard: the batch comes in seconds)."""
    deadline = time.monotonic() + timeout
    while text not in (found := logs(url, run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def capabilities(proc: psutil.Process) -> int:
    """The process's effective capability set (0: none; root without capabilities is checked like any user)."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    return int(status.split("CapEff:")[1].split()[0], 16)


def deployment_id(url: str, flow: str, name: str) -> str:
    flows = {f["id"]: f["name"] for f in api(url, "flows/filter")}
    return next(d["id"] for d in api(url, "deployments/filter") if d["name"] == name and flows[d["flow_id"]] == flow)


def run_processes(run_id: str) -> list[psutil.Process]:
    """The flow run's process (its worker started it with PREFECT__FLOW_RUN_ID) and all below it: the first started
    of those carrying the id (its children carry it too, and once pids wrap one can have a lower pid)."""
    carrying = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                carrying.append(proc)
    for proc in sorted(carrying, key=lambda p: (p.info["create_time"], p.pid)):
        with contextlib.suppress(psutil.Error):
            return [proc, *proc.children(recursive=True)]
    return []


def test_fedavg_over_three_silos_survives_a_killed_silo(federation):
    project, url, private = federation
    config = {"silos": list(SILOS), "eval_source": "data/eval", "exchange": str(project / "exchange"), "rounds": 1,
              "local_epochs": 1, "min_silos": 2, "silo_timeout_s": 150, "unreadable": [str(private / s) for s in SILOS]}
    silo_c = deployment_id(url, "silo", "c")
    # the module's other tests run silo c too (in a random order): only a run of this test's is killed
    before = {r["id"] for r in api(url, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [silo_c]}}})}
    run_id = api(url, f"deployments/{deployment_id(url, 'federated', 'coordinator')}/create_flow_run",
                 {"parameters": {"config": config}})["id"]
    killed = coordinator_caps = None
    deadline = time.monotonic() + 300  # a hang guard
    while killed is None or coordinator_caps is None:
        if time.monotonic() > deadline:  # which of the two was never seen, first: pytest cuts a long message short
            silo_runs = [(r["state_type"], r["id"]) for r in api(url, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [silo_c]}}})]
            pytest.fail(f"coordinator's process seen: {coordinator_caps is not None}; silo c killed: {killed}; silo c's "
                        f"runs: {silo_runs}\n{logs(url, run_id)[-2000:]}\n{worker_logs(project)[-4000:]}")
        if coordinator_caps is None and (family := run_processes(run_id)):
            coordinator_caps = capabilities(family[0])
        if killed is None:
            started = [r for r in api(url, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [silo_c]}}})
                       if r["id"] not in before]
            family = run_processes(started[0]["id"]) if started else []
            if family:  # silo c's first round is under way (its process is starting): kill it, -9, whole tree
                for proc in family:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                killed = started[0]["id"]
        time.sleep(0.1)
    assert coordinator_caps == 0, "the coordinator's flow run must have no capability (no DAC override)"
    assert all(os.stat(private / s).st_uid != 0 and os.stat(private / s).st_mode & 0o077 == 0 for s in SILOS)
    done = wait(url, run_id, timeout=300)
    text = logs_until(url, run_id, "round 1/1")  # a run's last log lines reach the server in batches
    runs = [(r["name"], r["state_type"], (r["state"] or {}).get("message")) for r in api(url, "flow_runs/filter")]
    assert done["state_type"] == "COMPLETED", ([line for line in text.splitlines() if "round" in line][-8:], runs, worker_logs(project))
    assert wait(url, killed, timeout=120)["state_type"] in ("CRASHED", "FAILED"), (  # a hang guard: final by now
        "the killed silo's run must not complete")
    assert "cannot read any of the 3 silo data paths" in text, text[-2000:]
    assert "round 1: silo c skipped" in text, text[-2000:]
    assert "round 1/1: 2 silos (a, b)" in text, text[-2000:]
    warnings = api(url, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}, "level": {"ge_": 30}}})
    assert any("silo c skipped" in w["message"] for w in warnings), "the skip is logged as a warning"
    # the final global model is an ordinary model file of the project
    from flows.core.model_file import read_meta

    meta = read_meta(project / "models" / "model.safetensors")
    assert meta.model_name == "test_resnet" and meta.classes == ["blue", "green", "red"]
    assert json.loads((project / "models" / "model.json").read_text())["sha256"]
    history = json.loads((project / "models" / "federated.json").read_text())["history"]
    assert [h["silos"] for h in history] == [2] and [h["examples"] for h in history] == [36]
    assert (project / "dvclive" / "federated" / "metrics.json").is_file()
    # only weights came back from the silos: each exchange file is a state dict of the model's keys
    from safetensors import safe_open

    sent = sorted(project.joinpath("exchange").rglob("[abc].safetensors"))
    assert [p.name for p in sent] == ["a.safetensors", "b.safetensors"], sent
    with safe_open(str(sent[0]), framework="pt") as handle:
        assert set(handle.keys()) == set(safe_open(str(project / "models" / "model.safetensors"), framework="pt").keys())


def test_a_coordinator_that_can_read_a_silo_folder_refuses_to_run(federation):
    """The guard is real: pointed at a folder it can read (its own evaluation images), the coordinator fails."""
    project, url, _ = federation
    config = {"silos": ["a"], "eval_source": "data/eval", "exchange": str(project / "exchange"), "rounds": 1,
              "unreadable": ["data/eval"]}
    run_id = api(url, f"deployments/{deployment_id(url, 'federated', 'coordinator')}/create_flow_run",
                 {"parameters": {"config": config}})["id"]
    failed = wait(url, run_id, timeout=180)
    assert failed["state_type"] == "FAILED", failed["state_type"]
    assert "the coordinator can read silo data at data/eval" in failed["state"]["message"], failed["state"]["message"]


def test_dp_and_secure_aggregation_through_the_workers_redo_a_round_without_a_killed_silo(federation):
    """DP-SGD (a target epsilon), secure aggregation and FedProx through the same three workers. Silo c's first round is
    killed after a and b were told to mask with it: the round is masked again without c (a and b reuse what they
    trained), never unmasked partially. Only masked updates ever sit in the exchange; the model card and the run's
    labels state each silo's epsilon (composition over rounds: tests/unit/test_private_fl.py)."""
    project, url, private = federation
    params = project / "params.yaml"
    original = params.read_text()
    raw = yaml.safe_load(original)
    raw["model"]["name"] = "test_efficientnet_gn"  # no BatchNorm: DP-SGD refuses test_resnet
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        config = {"silos": list(SILOS), "eval_source": "data/eval", "exchange": str(project / "exchange"), "rounds": 1,
                  "local_epochs": 1, "min_silos": 2, "silo_timeout_s": 150, "privacy": {"target_epsilon": 8.0},
                  "secure_aggregation": True, "proximal_mu": 0.01, "out": "models-private"}
        silo_c = deployment_id(url, "silo", "c")
        before = {r["id"] for r in api(url, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [silo_c]}}})}
        run_id = api(url, f"deployments/{deployment_id(url, 'federated', 'coordinator')}/create_flow_run",
                     {"parameters": {"config": config}})["id"]
        killed = kill_first_round(url, silo_c, before, project)
        done = wait(url, run_id, timeout=300)
        text = logs_until(url, run_id, "round 1/1")
        assert done["state_type"] == "COMPLETED", ([ln for ln in text.splitlines() if "round" in ln][-8:], worker_logs(project))
        assert wait(url, killed, timeout=120)["state_type"] in ("CRASHED", "FAILED")
    finally:
        params.write_text(original)
    assert "secure aggregation: 3 public keys exchanged" in text, text[-2000:]
    assert "round 1: silo(s) c did not deliver after the others masked with them" in text, text[-2000:]
    assert "round 1/1: 2 silos (a, b)" in text, text[-2000:]
    run_folder = next(p for p in (project / "exchange").iterdir() if (p / "setup").is_dir() and (p / "setup" / "c.json").is_file()
                      and "public_key" in json.loads((p / "setup" / "c.json").read_text()))
    assert not [p.name for p in run_folder.rglob("*.safetensors") if p.name != "global.safetensors"], "no clear update"
    assert sorted(p.name for p in run_folder.rglob("*.masked")) == ["a.masked", "b.masked"]  # the redo's
    card = json.loads((project / "models-private" / "model.json").read_text())["privacy"]
    assert card["secure_aggregation"] and card["dp_sgd"]["target_epsilon"] == 8.0
    assert {n: s["rounds"] for n, s in card["silos"].items()} == {"a": 1, "b": 1, "c": 0}
    assert all(7.9 <= card["silos"][n]["epsilon"] <= 8.0 for n in "ab")  # the whole budget, in the one round
    assert "epsilon" not in card["silos"]["c"]  # its killed round released nothing
    labels = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]["labels"]
    assert labels["privacy.a.epsilon"] == round(card["silos"]["a"]["epsilon"], 3), labels


def kill_first_round(url: str, deployment: str, before: set[str], project: Path) -> str:
    """Kill (-9, the whole tree) the silo's first training round's process as it starts; its flow run's id."""
    deadline = time.monotonic() + 300  # a hang guard
    while time.monotonic() < deadline:
        started = [r for r in api(url, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment]}}})
                   if r["name"].endswith("-r1") and r["id"] not in before]
        family = run_processes(started[0]["id"]) if started else []
        if family:
            for proc in family:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            return started[0]["id"]
        time.sleep(0.1)
    raise AssertionError(("the silo's first round never started", worker_logs(project)))
