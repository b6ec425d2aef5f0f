"""One training run over two hosts: two network namespaces, a worker and a clone in each, one pipeline run.

Host A's namespace reaches the server (on the machine's end of a veth pair) directly; host B's
reaches it through A (A forwards, in its own namespace). The pipeline run lands on one host's
worker (each worker has one slot), places node 1 as a `ddp-node` flow run, which the other
host's worker picks up; the two train with gloo over the namespaces' link (2 nodes × 1 process).

Weights: in fp32, with SGD, no flips and no BatchNorm (timm's test_vit), two nodes at batch 3 see the same
global batches as one process at batch 6 (the trainer deals each global batch out by rank), so the
weights differ only by the fp32 rounding of averaging two batch means instead of one: 1e-5.
(AdamW would amplify that rounding where a gradient is near zero, up to ~lr per step.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from flows.gateways.gpus import stand_in_env
from flows.host import server
from tests.integration.project import FINAL, api, env, make_project
from tests.integration.test_remote import free_port_on, sh

pytestmark = pytest.mark.slow

AUTH = "team:s3cret"
SETTINGS = {"model.name": "test_vit", "train.optimizer": "sgd", "train.precision": "fp32", "train.hflip": 0.0, "train.lr": 0.05,
            "train.epochs": 2, "data.image_size": 16}
TRAIN_STAGE = "flows.stages.train"


def namespace_problem() -> str | None:
    """Why this machine cannot make the two hosts, or None."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if not shutil.which("ip"):
        return "`ip` is not installed (.ci/run installs iproute2)"
    probe = f"tdprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """Two namespaces (A, B) and the machine's end of A's link, where the server listens."""

    def __init__(self, tmp: Path) -> None:
        n = os.getpid() % 100000
        octet = 16 + os.getpid() % 200
        self.a, self.b = f"tdna{n}", f"tdnb{n}"
        self.server_ip, self.a_up = f"10.232.{octet}.1", f"10.232.{octet}.2"  # machine <-> A
        self.a_down, self.b_ip = f"10.233.{octet}.1", f"10.233.{octet}.2"  # A <-> B
        self.b_net = f"10.233.{octet}.0/30"
        self.veths = (f"tdma{n}", f"tdam{n}", f"tdab{n}", f"tdba{n}")
        self.tmp, self.procs, self.url = tmp, [], ""

    def make(self) -> None:
        m_a, a_m, a_b, b_a = self.veths
        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", m_a, "type", "veth", "peer", "name", a_m)
        sh("ip", "link", "set", a_m, "netns", self.a)
        sh("ip", "addr", "add", f"{self.server_ip}/30", "dev", m_a)
        sh("ip", "link", "set", m_a, "up")
        sh("ip", "route", "add", self.b_net, "via", self.a_up, "dev", m_a)  # goes with the veth
        sh("ip", "netns", "exec", self.a, "ip", "link", "add", a_b, "type", "veth", "peer", "name", b_a)
        sh("ip", "netns", "exec", self.a, "ip", "link", "set", b_a, "netns", self.b)
        for ns, cmds in (
            (self.a, [["ip", "addr", "add", f"{self.a_up}/30", "dev", a_m], ["ip", "link", "set", a_m, "up"],
                      ["ip", "addr", "add", f"{self.a_down}/30", "dev", a_b], ["ip", "link", "set", a_b, "up"],
                      ["ip", "link", "set", "lo", "up"], ["sysctl", "-qw", "net.ipv4.ip_forward=1"]]),
            (self.b, [["ip", "addr", "add", f"{self.b_ip}/30", "dev", b_a], ["ip", "link", "set", b_a, "up"],
                      ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", self.a_down]]),
        ):
            for cmd in cmds:
                sh("ip", "netns", "exec", ns, *cmd)

    def env(self, **extra: str) -> dict[str, str]:
        return env(PREFECT_API_URL=self.url, PREFECT_API_AUTH_STRING=AUTH, **extra)

    def worker(self, ns: str, clone: Path, name: str) -> None:
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "tunedeck", "worker", "--pool", "local", "--gpus", "0"], cwd=clone,
            env=self.env(PREFECT_LOGGING_LEVEL="INFO", TUNEDECK_HOST=name, **stand_in_env(1, self.tmp / "stand-in-gpus")),
            stdout=open(self.tmp / f"worker-{name}.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def close(self, root: Path | None) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        if self.url and root is not None:
            server.stop(root=root)
        for ns in (self.b, self.a):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # the veths go with them
        subprocess.run(["ip", "link", "del", self.veths[0]], capture_output=True)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    problem = namespace_problem()
    if problem:
        pytest.skip(f"two-host test skipped: {problem}")
    tmp = tmp_path_factory.mktemp("nodes")
    hosts = Hosts(tmp)
    clone_a = None
    try:
        hosts.make()
        clone_a = make_project(tmp / "host-a" / "project")
        clone_b = tmp / "host-b" / "project"
        clone_b.parent.mkdir()
        subprocess.run(["git", "clone", "-q", str(clone_a), str(clone_b)], check=True, env=env())
        previous = os.environ.get(server.AUTH_VARIABLE)
        os.environ[server.AUTH_VARIABLE] = AUTH
        try:
            hosts.url = server.start(free_port_on(hosts.server_ip), root=clone_a, host=hosts.server_ip)
        finally:
            os.environ.pop(server.AUTH_VARIABLE) if previous is None else os.environ.update({server.AUTH_VARIABLE: previous})
        subprocess.run(["tunedeck", "deploy"], cwd=clone_a, env=hosts.env(), check=True, capture_output=True)
        hosts.worker(hosts.a, clone_a, "node-a")
        hosts.worker(hosts.b, clone_b, "node-b")
        hosts.clone_a, hosts.clone_b = clone_a, clone_b
        yield hosts
    finally:
        hosts.close(clone_a)


def call(hosts: Hosts, path: str, body: dict | None = None):
    return api(hosts.url, path, body, auth=AUTH)


def trigger(hosts: Hosts, settings: dict) -> str:
    deployment = next(d for d in call(hosts, "deployments/filter") if d["name"] == "pipeline")
    overrides = [f"{k}={v}" for k, v in settings.items()]
    body = {"parameters": {"overrides": overrides, "promote": False}}
    return call(hosts, f"deployments/{deployment['id']}/create_flow_run", body)["id"]


def flow_run(hosts: Hosts, run_id: str) -> dict:
    return call(hosts, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]


def node_runs(hosts: Hosts) -> list[dict]:
    return [r for r in call(hosts, "flow_runs/filter", {"sort": "START_TIME_DESC"})
            if r["parameters"].get("node_rank") is not None]


def until(check, what: str, timeout: float, hosts: Hosts):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    logs = "\n".join((hosts.tmp / f"worker-{n}.log").read_text(errors="replace")[-2500:] for n in ("node-a", "node-b"))
    raise AssertionError(f"{what} not within {timeout} s; workers:\n{logs}")


def log_of(hosts: Hosts, run_id: str) -> str:
    lines = call(hosts, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"})
    return "\n".join(entry["message"] for entry in lines)


def experiment_model(clone: Path, name: str) -> Path:
    """The model file of DVC experiment `name` in clone's cache (its dvc.lock names the md5)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=clone,
                          capture_output=True, text=True, check=True).stdout.split()
    ref = next(r for r in refs if r.endswith(f"/{name}"))
    lock = yaml.safe_load(subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=clone, capture_output=True,
                                         text=True, check=True).stdout)
    md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.safetensors")
    return clone / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]


def reference_model(tmp: Path, clone: Path) -> Path:
    """The same training as one process at the global batch (6), by `dvc repro train`."""
    ref = tmp / "reference"
    subprocess.run(["git", "clone", "-q", str(clone), str(ref)], check=True, env=env())
    raw = yaml.safe_load((ref / "params.yaml").read_text())
    for key, value in {**SETTINGS, "train.batch_size": 6}.items():
        group, name = key.split(".")
        raw[group][name] = value
    (ref / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = subprocess.run(["dvc", "repro", "train"], cwd=ref, env=env(TUNEDECK_PREFECT="off"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ref / "models" / "model.safetensors"


def test_two_nodes_train_one_model_equal_to_one_process_at_the_global_batch(hosts):
    from safetensors.torch import load_file

    run_id = trigger(hosts, {**SETTINGS, "base.nodes": 2, "train.batch_size": 3})
    done = until(lambda: (r := flow_run(hosts, run_id))["state_type"] in FINAL and r, "the two-node run", 300, hosts)
    log = log_of(hosts, run_id)
    assert done["state_type"] == "COMPLETED", log[-3000:]
    node = until(lambda: [r for r in node_runs(hosts) if r["state_type"] in FINAL], "the node run's end", 60, hosts)[0]
    assert node["state_type"] == "COMPLETED", log_of(hosts, node["id"])[-3000:]
    hosts_seen = {done["labels"].get("tunedeck.host"), node["labels"].get("tunedeck.host")}
    assert hosts_seen == {"node-a", "node-b"}, hosts_seen  # one run, two hosts, a slot on each
    assert "launching 1 DDP processes with torchrun on node 0 of 2" in log
    assert "node 1 of 2: joining the rendezvous" in log_of(hosts, node["id"])

    leader = hosts.clone_a if done["labels"]["tunedeck.host"] == "node-a" else hosts.clone_b
    two = load_file(str(experiment_model(leader, done["name"])))
    one = load_file(str(reference_model(hosts.tmp, hosts.clone_a)))
    assert two.keys() == one.keys()
    worst = max((two[k].double() - one[k].double()).abs().max().item() for k in two)
    assert worst <= 1e-5, worst


def training_ranks(root: Path) -> list[psutil.Process]:
    """The DDP worker processes (torchrun's children) of runs under root."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            cmd, cwd = proc.info["cmdline"] or [], proc.info["cwd"] or ""
            if TRAIN_STAGE in cmd and cwd.startswith(str(root)) and "RANK" in proc.environ():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def leftovers(root: Path) -> list[str]:
    """torchrun agents and DDP ranks still alive for runs under root."""
    left = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmd, cwd = proc.info["cmdline"] or [], proc.info["cwd"] or ""
        if cwd.startswith(str(root)) and (TRAIN_STAGE in cmd or "torch.distributed.run" in cmd):
            left.append(f"{proc.pid} {' '.join(cmd)[:120]}")
    return left


RANK_KILL_HANG_S = 90  # a hang guard: both runs end about 12 s after the kill (README; the test prints it)


def test_killing_one_nodes_rank_fails_the_run_on_both_hosts_and_leaves_no_process(hosts):
    before = {r["id"] for r in node_runs(hosts)}
    run_id = trigger(hosts, {**SETTINGS, "base.nodes": 2, "train.batch_size": 3, "train.epochs": 400})
    ranks = until(lambda: len(r := training_ranks(hosts.tmp)) == 2 and r, "two training ranks", 240, hosts)
    victim = next(p for p in ranks if p.environ().get("RANK") == "1")
    victim.kill()
    killed = time.monotonic()
    leader = until(lambda: (r := flow_run(hosts, run_id))["state_type"] in FINAL and r, "the leader's end",
                   RANK_KILL_HANG_S, hosts)
    node = until(lambda: [r for r in node_runs(hosts) if r["id"] not in before and r["state_type"] in FINAL],
                 "the node run's end", RANK_KILL_HANG_S, hosts)[0]
    print(f"\nrank 1 killed: node run {node['state_type']}, node 0's run {leader['state_type']}, "
          f"{time.monotonic() - killed:.1f} s later")
    assert leader["state_type"] in ("FAILED", "CRASHED"), leader["state_type"]
    assert node["state_type"] in ("FAILED", "CRASHED", "CANCELLED"), node["state_type"]
    assert "training processes" in log_of(hosts, node["id"])
    until(lambda: not leftovers(hosts.tmp), "no training process left", 60, hosts)  # a hang guard: gone at once
