"""The one way tunedeck calls DVC: list arguments, output streamed, exit status checked."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from flows.core.errors import TunedeckError


def dvc_bin() -> str:
    """dvc from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.exists() else "dvc"


def output_tail(lines: list[str]) -> str:
    """The last lines DVC printed that say something (not its support link), for an error sentence."""
    useful = [line for line in lines if line.strip() and not line.startswith("Having any troubles?")]
    return " | ".join(useful[-4:])[-500:]


def dvc(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        on_line: Callable[[str], None] | None = None) -> str:
    """Run ``dvc args``; each output line goes to on_line; a non-zero exit is a TunedeckError."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.Popen([dvc_bin(), *args], cwd=cwd, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if on_line is not None:
            on_line(lines[-1])
    if proc.wait() != 0:
        raise TunedeckError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}): {output_tail(lines)}")
    return "\n".join(lines)


AUTH_SIGNS = ("permission denied", "authentication", "auth fail", "access denied", "credentials", "unauthorized",
              "forbidden", "no such key", "not allowed", "publickey")
REACH_SIGNS = ("connection refused", "connect call failed", "errno 111", "errno 113", "errno 110", "timed out", "timeout", "no route to host", "name or service not known",
               "could not resolve", "network is unreachable", "connection reset", "temporary failure in name resolution")


def default_remote(cwd: Path | None = None) -> tuple[str, str]:
    """(name, url) of the default DVC remote, or ('', '') when there is none."""
    try:
        from dvc.repo import Repo

        with Repo(str(cwd or Path.cwd())) as repo:
            name = repo.config.get("core", {}).get("remote", "")
            return name, repo.config.get("remote", {}).get(name, {}).get("url", "") if name else ""
    except Exception:  # noqa: BLE001 - only used to word an error; never raise from here
        return "", ""


def sync(direction: str, *args: str, cwd: Path | None = None,
         on_line: Callable[[str], None] | None = None) -> str:
    """`dvc pull` or `dvc push`; a failure says in one sentence whether it was credentials, the network or else."""
    try:
        return dvc(direction, *args, cwd=cwd, on_line=on_line)
    except TunedeckError as exc:
        text = str(exc)
        name, url = default_remote(cwd)
        where = f"DVC remote '{name}' ({url})" if name else "DVC remote"
        low = text.lower()
        if not name:
            why = "there is no default DVC remote: add one with `dvc remote add -d NAME URL` and commit .dvc/config"
        elif any(sign in low for sign in AUTH_SIGNS):
            why = (f"the {where} refused this host's credentials: set them in .dvc/config.local "
                   f"(`dvc remote modify --local {name} keyfile|password|user ...`) or the remote's usual environment "
                   "variables, then retry")
        elif any(sign in low for sign in REACH_SIGNS):
            why = f"this host cannot reach the {where}: check the address, port and network, then retry"
        else:
            why = f"the {where} failed"
        raise TunedeckError(f"dvc {direction} failed: {why} ({text.split(': ', 1)[-1][:300]}).") from None
