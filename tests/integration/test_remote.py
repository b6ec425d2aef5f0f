"""The remote GPU host case, on one machine: a worker in a network namespace of its own.

The "workstation" serves Prefect on its end of a veth pair (with an auth string), and an sshd on
the same address holds the git repository and the DVC remote. The "GPU host" is a network
namespace with its own clone: its worker reaches the server, git and the DVC remote only
through that address, pulls code and data, trains, pushes the model and reports back.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from flows.gateways.gpus import stand_in_env
from flows.host import server
from tests.integration.project import FINAL, api, env, make_project

pytestmark = pytest.mark.slow

AUTH = "team:s3cret"
SSHD = "/usr/sbin/sshd"


def namespace_problem() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "creating a network namespace needs root (CI runs as root)"
    for tool in ("ip", "ssh", "ssh-keygen", "git"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed (.ci/run installs iproute2 and openssh)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is not installed (.ci/run installs openssh-server)"
    probe = f"tdprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip()[:200]}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=120, **kwargs)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}"
    return proc


def wait_port(host: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on {host}:{port}")


def free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Site:
    """Everything the module's tests share: addresses, keys, the two project folders, the server."""

    def __init__(self, tmp: Path) -> None:
        n = os.getpid() % 100000
        self.ns, self.veth_host, self.veth_ns = f"tdgpu{n}", f"tdh{n}", f"tdn{n}"
        octet = 16 + os.getpid() % 200
        self.host_ip, self.ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"
        self.tmp = tmp
        self.home = tmp / "home"  # the hosts' HOME: known_hosts for DVC's ssh client (asyncssh) lives here
        self.key = tmp / "keys" / "id_worker"
        self.procs: list[subprocess.Popen] = []
        self.url = ""

    # --- network -------------------------------------------------------------------------------
    def make_network(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        sh("ip", "link", "set", self.veth_ns, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth_host)
        sh("ip", "link", "set", self.veth_host, "up")
        for cmd in (["ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.veth_ns],
                    ["ip", "link", "set", self.veth_ns, "up"], ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", self.ns, *cmd)

    def in_ns(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    # --- sshd: git server and DVC remote -----------------------------------------------------------
    def start_sshd(self) -> None:
        keys = self.key.parent
        keys.mkdir(parents=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "host"))
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        shutil.copy(f"{self.key}.pub", keys / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
        self.ssh_port = free_port_on(self.host_ip)
        config = keys / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {self.host_ip}", f"Port {self.ssh_port}", f"HostKey {keys / 'host'}",
            f"AuthorizedKeysFile {keys / 'authorized_keys'}", f"PidFile {keys / 'sshd.pid'}",
            "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp", "",
        ]))
        self.procs.append(subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                           stderr=open(keys / "sshd.log", "wb"), start_new_session=True))
        wait_port(self.host_ip, self.ssh_port)
        host_key = (keys / "host.pub").read_text().split()[:2]
        known = self.home / ".ssh" / "known_hosts"
        known.parent.mkdir(parents=True)
        known.write_text(f"[{self.host_ip}]:{self.ssh_port} {' '.join(host_key)}\n")
        self.known_hosts = known

    def ssh_url(self, path: Path) -> str:
        return f"ssh://{getpass.getuser()}@{self.host_ip}:{self.ssh_port}{path}"

    def env(self, **extra: str) -> dict[str, str]:
        """What a host's shell has: HOME with known_hosts, git's ssh command with the key, the server and its auth."""
        base = env(
            HOME=str(self.home), PREFECT_API_URL=self.url, PREFECT_API_AUTH_STRING=AUTH,
            GIT_SSH_COMMAND=(f"ssh -i {self.key} -o IdentitiesOnly=yes -o BatchMode=yes "
                             f"-o UserKnownHostsFile={self.known_hosts}"),
            **extra,
        )
        base.pop("SSH_AUTH_SOCK", None)
        return base

    def run(self, cwd: Path, *args: str, ns: bool = False) -> subprocess.CompletedProcess:
        cmd = self.in_ns(*args) if ns else list(args)
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=self.env(), timeout=300)
        assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc

    # --- teardown --------------------------------------------------------------------------------
    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        if self.url:
            server.stop(root=self.workstation)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)  # takes the veth pair with it


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    problem = namespace_problem()
    if problem:
        pytest.skip(f"remote-worker test skipped: {problem}")
    tmp = tmp_path_factory.mktemp("remote")
    site = Site(tmp)
    try:
        site.make_network()
        site.start_sshd()
        store, bare = tmp / "store" / "dvc", tmp / "git" / "project.git"
        store.mkdir(parents=True)

        # The workstation: the data goes to the DVC remote over SSH, the code to the git server.
        site.workstation = ws = make_project(tmp / "workstation")
        site.run(ws, "dvc", "remote", "add", "-f", "-d", "shared", site.ssh_url(store))
        site.run(ws, "dvc", "remote", "modify", "--local", "shared", "keyfile", str(site.key))
        site.run(ws, "git", "rm", "-r", "-q", "--cached", "data/tiny")
        site.run(ws, "dvc", "add", "-q", "data/tiny")
        site.run(ws, "git", "add", "-A")
        site.run(ws, "git", "commit", "-q", "-m", "data under DVC, remote over SSH")
        site.run(ws, "dvc", "push", "-q")
        sh("git", "init", "-q", "--bare", str(bare))
        site.run(ws, "git", "remote", "add", "origin", site.ssh_url(bare))
        site.run(ws, "git", "push", "-q", "-u", "origin", "HEAD")

        # The server on the workstation's address, with an auth string.
        previous = os.environ.get(server.AUTH_VARIABLE)
        os.environ[server.AUTH_VARIABLE] = AUTH
        try:
            site.url = server.start(free_port_on(site.host_ip), root=ws, host=site.host_ip)
        finally:
            os.environ.pop(server.AUTH_VARIABLE) if previous is None else os.environ.update(
                {server.AUTH_VARIABLE: previous})
        site.run(ws, "tunedeck", "deploy")

        # The GPU host: its own clone (over SSH, from inside the namespace), its own credentials.
        site.gpu_host = gh = tmp / "gpu-host" / "project"
        gh.parent.mkdir()
        site.run(gh.parent, "git", "clone", "-q", site.ssh_url(bare), str(gh), ns=True)
        site.run(gh, "dvc", "remote", "modify", "--local", "shared", "keyfile", str(site.key), ns=True)
        site.procs.append(subprocess.Popen(
            site.in_ns("tunedeck", "worker", "--pool", "local", "--git-pull", "--gpus", "0"), cwd=gh,
            env=site.env(PREFECT_LOGGING_LEVEL="INFO", TUNEDECK_HOST="gpu-host", **stand_in_env(1, tmp / "stand-in-gpus-1")),
            stdout=open(tmp / "worker.log", "wb"),
            stderr=subprocess.STDOUT, start_new_session=True,
        ))
        yield site
    finally:
        site.close()


def call(site: Site, path: str, body: dict | None = None):
    return api(site.url, path, body, auth=AUTH)


def trigger(site: Site, **parameters) -> str:
    deployment = next(d for d in call(site, "deployments/filter") if d["name"] == "pipeline")
    return call(site, f"deployments/{deployment['id']}/create_flow_run", {"parameters": parameters})["id"]


def finish(site: Site, run_id: str, timeout: float = 420) -> tuple[dict, str]:
    """The flow run once final, and its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = call(site, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]
        if flow_run["state_type"] in FINAL:
            break
        time.sleep(1)
    else:
        worker = (site.tmp / "worker.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"flow run {run_id} did not finish in {timeout} s; worker log:\n{worker}")
    lines = call(site, "logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"})
    return flow_run, "\n".join(entry["message"] for entry in lines)


def test_a_worker_in_another_network_namespace_pulls_trains_pushes_and_reports(site):
    ws, gh = site.workstation, site.gpu_host
    # a commit made after the GPU host cloned: the run must use it (the worker git-pulls first)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["epochs"] += 1
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    site.run(ws, "git", "commit", "-q", "-am", "one more epoch")
    site.run(ws, "git", "push", "-q")
    head = site.run(ws, "git", "rev-parse", "HEAD").stdout.strip()

    flow_run, log = finish(site, trigger(site))
    assert flow_run["state_type"] == "COMPLETED", f"{flow_run['state']['message']}\n{log[-3000:]}"
    assert f"code: {gh} at {head[:12]}\n" in log + "\n", "the run must use the GPU host's clone at the newest commit"
    assert any((gh / ".dvc" / "cache").rglob("*")), "dvc pull brought the data over SSH into the host's DVC cache"
    assert not (gh / "models" / "model.safetensors").exists(), "the run worked in a workspace of its own, not the clone"
    assert not (ws / "models" / "model.safetensors").exists(), "the run must not have used the workstation's folder"
    rev = experiment_rev(site, gh, flow_run["name"])
    lock = yaml.safe_load(site.run(gh, "git", "show", f"{rev}:dvc.lock").stdout)
    model_md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.safetensors")
    assert (site.tmp / "store" / "dvc" / "files" / "md5" / model_md5[:2] / model_md5[2:]).is_file(), (
        "dvc push put the model on the SSH remote")
    trained = yaml.safe_load(site.run(gh, "git", "show", f"{rev}:params.yaml").stdout)
    assert trained["train"]["epochs"] == params["train"]["epochs"]


def experiment_rev(site: Site, clone, name: str) -> str:
    """The commit of the DVC experiment a pipeline run saved (named after the flow run), from the host's clone."""
    for baseline in json.loads(site.run(clone, "dvc", "exp", "show", "--json").stdout):
        for exp in baseline.get("experiments") or []:
            if exp["name"] == name:
                return exp["revs"][0]["rev"]
    raise AssertionError(f"no DVC experiment named {name} in {clone}")


def test_a_dvc_remote_without_credentials_fails_the_run_in_one_sentence(site):
    gh = site.gpu_host
    local = gh / ".dvc" / "config.local"
    saved = local.read_text()
    try:
        local.unlink()  # this host has no key for the remote now
        shutil.rmtree(gh / ".dvc" / "cache", ignore_errors=True)  # and no data (none yet if this test runs first):
        shutil.rmtree(gh / "data" / "tiny", ignore_errors=True)  # dvc pull must ask the remote
        flow_run, log = finish(site, trigger(site, push=False))
    finally:
        local.write_text(saved)
    message = flow_run["state"]["message"] or ""
    assert flow_run["state_type"] == "FAILED", log[-2000:]
    assert "dvc pull failed: the DVC remote 'shared' (ssh://" in message and "refused this host's credentials" in message, (
        f"{message}\n{log[-2000:]}")
    assert "dvc remote modify --local shared" in message


def _panel_rows(app) -> dict[str, str]:
    from tui.widgets.gpu_panel import GpuPanel
    from tui.widgets.line_table import LineTable

    table = app.screen.query_one(GpuPanel).query_one(LineTable)
    return {key: table.row(key).plain for key in table._keys}


@pytest.mark.anyio
async def test_two_hosts_gpus_on_one_dashboard_each_joined_to_its_run_and_a_stopped_one_goes_stale(site, monkeypatch, tmp_path):
    """The GPU host (in its namespace) and the workstation each run a worker and one run; a dashboard
    started elsewhere shows both hosts' GPUs, each with its run; the workstation's worker stops: it shows stale
    (its last event says offline; bench/responsiveness.py measures how soon), the GPU host does not."""
    from tests.tui.conftest import settle
    from tui.app import make_app
    from tui.providers import live_providers

    ws = site.workstation
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_API_URL", site.url)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", AUTH)
    first = trigger(site, overrides=["train.epochs=400"], pull=False, push=False)
    worker = second = None
    app = make_app(providers=live_providers(), refresh_s=0.25)
    try:
        async with app.run_test(size=(200, 50)) as pilot:
            async def until(check, what: str, timeout: float = 240):
                deadline = time.monotonic() + timeout
                while not check():
                    assert time.monotonic() < deadline, (what, _panel_rows(app))
                    await settle(pilot, 1)
                    await pilot.pause(0.2)
                return time.monotonic()

            names = {}

            def on_gpu(host: str, run_id: str, gpus: tuple[int, ...] = (0,)) -> bool:
                """Whether the run shows on one of the host's GPUs (the worker holds the first free slot it gets)."""
                if run_id not in names:
                    found = call(site, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]
                    if found["state_type"] != "RUNNING":
                        return False
                    names[run_id] = found["name"]
                rows = _panel_rows(app)
                return any(names[run_id] in rows.get(f"{host}/gpu{g}", "") for g in gpus)

            await until(lambda: on_gpu("gpu-host", first), "the GPU host's run on its GPU 0")
            # the GPU host's one slot is busy now: the workstation's worker takes the next run
            worker = subprocess.Popen(["tunedeck", "worker", "--pool", "local", "--gpus", "0,1"], cwd=ws,
                                      env=site.env(TUNEDECK_HOST="workstation", **stand_in_env(2, site.tmp / "stand-in-gpus-2")),
                                      stdout=open(site.tmp / "worker-ws.log", "wb"), stderr=subprocess.STDOUT,
                                      start_new_session=True)
            site.procs.append(worker)
            second = trigger(site, overrides=["train.epochs=400"], pull=False, push=False)
            await until(lambda: on_gpu("workstation", second, (0, 1)), "the workstation's run on one of its GPUs")
            rows = _panel_rows(app)
            assert names[first] in rows["gpu-host/gpu0"] and names[second] not in rows["gpu-host/gpu0"], rows
            held, other = ("workstation/gpu0", "workstation/gpu1") if names[second] in rows["workstation/gpu0"] \
                else ("workstation/gpu1", "workstation/gpu0")
            assert names[second] in rows[held] and "idle" in rows[other] and "stale" not in rows["host:gpu-host"], rows
            os.killpg(worker.pid, signal.SIGTERM)
            # a hang guard (60 s): stale comes in about 2 s, and at worst STALE_AFTER_S (10 s) after the last event
            await until(lambda: "stale" in _panel_rows(app).get("host:workstation", ""), "workstation stale", 60)
            assert "stale" not in _panel_rows(app)["host:gpu-host"]
        assert worker.wait(timeout=60) is not None  # a hang guard: the worker stops in seconds
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        for run_id in filter(None, (first, second)):
            with contextlib.suppress(Exception):
                call(site, f"flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
