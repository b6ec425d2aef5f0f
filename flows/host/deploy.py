"""`tunedeck deploy` and `tunedeck worker`: Prefect work pools, deployments and GPU-aware workers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.contracts.settings import HEARTBEAT_S, Settings
from flows.core.errors import TunedeckError
from flows.gateways import prefect_api
from flows.gateways.gpus import cpu_slot_name, gpu_states, host, slot_name
from flows.host.plan import host_queue

DEFAULT_POOL = "local"


def reachable() -> str:
    """The Prefect API URL, or a TunedeckError saying how to start one."""
    url = prefect_api.api_url()
    if not url or not prefect_api.healthy(url, timeout=3.0):
        where = f"at {url} " if url else ""
        raise TunedeckError(f"the Prefect server {where}does not answer: start it with `tunedeck server start` (or fix PREFECT_API_URL).")
    os.environ["PREFECT_API_URL"] = url
    return url


def ensure_pool(name: str) -> None:
    """The process work pool `name` on the server, created when missing."""
    prefect_api.work_pool(name, create=True)


ZOMBIE_AUTOMATION = "tunedeck: crash runs whose host went silent"
def ensure_zombie_automation(after_s: int) -> None:
    """Prefect's zombie detection: a running flow run whose heartbeats stop for after_s seconds is marked Crashed.

    For a host that dies whole (power, kernel, SIGKILL of its worker): nothing on it is left to
    report the run's end. Created once, by name; updated when after_s changed since.
    """
    prefect_api.ensure_crash_on_silence(
        ZOMBIE_AUTOMATION, after_s,
        description="A run whose process stopped sending heartbeats (its host died) is marked Crashed; run it "
                    "again to resume from its checkpoint on the DVC remote.",
        message=f"no heartbeat for {after_s} s: its host or worker died; run it again to resume")


ENGINE = "command=python -m prefect.engine"  # one process per run (Prefect's default adds a supervisor: +1 s), as prefect.yaml's


def deploy_flow(root: Path, entrypoint: str, name: str, pool: str) -> str:
    """`prefect deploy ENTRYPOINT --name NAME --pool POOL` with prefect.yaml's pull step (the worker's own clone);
    the deployment's full name, FLOW/NAME."""
    proc = prefect_api.cli("deploy", entrypoint, "--name", name, "--pool", pool, "--job-variable", ENGINE, cwd=root,
                       env=Settings(project=root).env())
    check_deployed(proc, f"{entrypoint} --name {name}")
    return name


def check_deployed(proc: subprocess.CompletedProcess, what: str) -> None:
    """A failed `prefect deploy` in one sentence, with the last lines it printed."""
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise TunedeckError(f"`prefect deploy {what}` failed: {' | '.join(tail)}")


def deploy(settings: Settings, root: Path | None = None) -> list[str]:
    """Create the work pool, the zombie detection (after settings.zombie_after_s) and prefect.yaml's deployments;
    return their names."""
    root = root or Path.cwd()
    after_s = settings.zombie_after_s
    reachable()
    ensure_pool(DEFAULT_POOL)
    ensure_zombie_automation(after_s)
    check_deployed(prefect_api.cli("deploy", "--all", cwd=root, env=Settings(project=root.resolve()).env()), "--all")
    import yaml

    return [d["name"] for d in yaml.safe_load((root / "prefect.yaml").read_text())["deployments"]]


def worker_command(settings: Settings, pool: str, gpus: str | None, git_pull: bool = False, root: Path | None = None,
                   cpu_slots: int = 1) -> tuple[list[str], dict[str, str], Settings]:
    """Check the project, pool and GPUs, create their slots; the prefect worker command, its whole environment and
    the settings its runs read there.

    Without GPUs the worker runs cpu_slots runs at once on the CPU, each with its share of the cores.
    """
    root = (root or Path.cwd()).resolve()
    if cpu_slots < 1 or (gpus and cpu_slots != 1):
        raise TunedeckError(f"--cpu-slots {cpu_slots}: give 1 or more, and only on a worker without --gpus "
                            "(a GPU worker runs one run per GPU).")
    if not (root / "dvc.yaml").is_file():
        raise TunedeckError(f"{root} has no dvc.yaml: start `tunedeck worker` in the project's folder (a clone of it on this host).")
    if git_pull and not (root / ".git").exists():
        raise TunedeckError(f"--git-pull needs a git clone, and {root} is not one: clone the project's repository here first.")
    reachable()
    if not prefect_api.work_pool(pool, create=False):
        raise TunedeckError(f"work pool '{pool}' does not exist on the server: run `tunedeck deploy` (it creates '{DEFAULT_POOL}') or name another with --pool.")
    env = {
        "PREFECT_API_URL": os.environ["PREFECT_API_URL"],
        # poll for scheduled runs twice a second (Prefect's default is every 10 s) so a run starts promptly
        "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "0.5"),
        "PREFECT_WORKER_PREFETCH_SECONDS": os.environ.get("PREFECT_WORKER_PREFETCH_SECONDS", "1"),
        # runs send a heartbeat every 30 s (Prefect's default: 180): a dead host's run is Crashed ZOMBIE_AFTER_S after
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S)),
        # runs use this host's clone (flows.host.steps.checkout: the project setting), and import its code first
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
        # the deployments' command is `python -m prefect.engine`: this environment's python
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    if gpus:
        try:
            wanted = [int(i) for i in gpus.split(",")]
        except ValueError:
            raise TunedeckError(f"--gpus '{gpus}' is not a list of GPU indices like 0,1.") from None
        present = [g.index for g in gpu_states()]
        missing = [i for i in wanted if i not in present]
        if missing:
            have = ",".join(map(str, present)) or "none"
            raise TunedeckError(f"GPU {missing[0]} does not exist on this host (its GPUs: {have}): fix --gpus.")
        runs = settings.but(project=root, git_pull=git_pull, gpus=",".join(map(str, wanted)), cpu_slots=1)
        slots = [slot_name(i, host(settings.host)) for i in wanted]
    else:
        runs = settings.but(project=root, git_pull=git_pull, gpus="", cpu_slots=cpu_slots)
        slots = [cpu_slot_name(i, host(settings.host)) for i in range(cpu_slots)]
    prefect_api.ensure_limits(slots)
    mine = host_queue(host(settings.host))  # `tunedeck plan --run` puts a run here: this host's workers alone take it
    prefect_api.ensure_queue(pool, mine)
    exe = Path(sys.executable).parent / "prefect"
    cmd = [str(exe), "worker", "start", "--pool", pool, "--type", "process", "--limit", str(len(slots)),
           "--work-queue", "default", "--work-queue", mine]
    return cmd, runs.environ({**os.environ, **env}), runs
