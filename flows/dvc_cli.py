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
        tail = " | ".join(line for line in lines[-4:] if line.strip())
        raise TunedeckError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}): {tail[-500:]}")
    return "\n".join(lines)
