"""A temporary copy of this repository with tiny data, for end-to-end runs of the real tools."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.conftest import ROOT, tiny_params_dict, write_images

EMPTY_HF = Path(tempfile.gettempdir()) / "tunedeck-tests-empty-hf"
SKIP = ("data/demo/", "dvclive/", "eval/", "dvc.lock", "models/model", ".tunedeck/", "weights/demo")


def project_files() -> list[str]:
    """Tracked files and new, not-ignored ones (so uncommitted work is what gets tested)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return [f for f in out if f and not f.startswith(SKIP) and (ROOT / f).is_file()]


def env(**extra: str) -> dict[str, str]:
    """The environment the tools run in: this venv first on PATH, a fixed git identity."""
    base = dict(os.environ)
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    base.update(
        GIT_AUTHOR_NAME="tunedeck tests", GIT_AUTHOR_EMAIL="tests@tunedeck.invalid",
        GIT_COMMITTER_NAME="tunedeck tests", GIT_COMMITTER_EMAIL="tests@tunedeck.invalid",
        HF_HUB_OFFLINE="1", DO_NOT_TRACK="1",
        HF_HOME=str(EMPTY_HF), HF_HUB_CACHE=str(EMPTY_HF / "hub"),  # no cached weights, whatever this machine has
    )
    base.pop("PREFECT_API_URL", None)
    base.update(extra)
    return base


def migrated_prefect_home() -> Path:
    """A Prefect home as a first server start leaves it (the SQLite database migrated, block types registered
    and memoised in memo_store.toml), made once per Prefect version on this machine and copied into every
    test project.

    A server's first start on an empty home spends most of its start-up there: measured 7.8–8.0 s of CPU
    against 3.8–4.3 s on a copy of this (a server start on 2 cores, the suite running beside it), and the
    suite starts about forty. A user's first `tunedeck server start` still migrates; the tests' starts are
    what every later start is. Made through a real start and stop, then SQLite's backup API (one consistent
    file), then renamed into place: two test workers making it at once each make a whole one.
    """
    import prefect

    from flows.host import server

    template = Path(tempfile.gettempdir()) / f"tunedeck-tests-prefect-{prefect.__version__}"
    if (template / "prefect.db").is_file():
        return template
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "dvc.yaml").write_text("stages: {}\n")
        server.start(free_port(), root=root)
        server.stop(root=root)
        home, partial = root / ".tunedeck" / "prefect", root / "template"
        partial.mkdir()
        shutil.copy2(home / "memo_store.toml", partial)
        src, dst = sqlite3.connect(home / "prefect.db"), sqlite3.connect(partial / "prefect.db")
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        try:
            os.rename(partial, template)
        except OSError:  # another worker's is there already: as good
            pass
    return template


def make_project(dest: Path) -> Path:
    """Copy the repo to dest, add tiny images, shrink params.yaml, and commit it all to a new git repo; its
    Prefect home starts migrated (migrated_prefect_home)."""
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    write_images(dest / "data" / "tiny", {"red": 10, "green": 10, "blue": 10})
    raw = tiny_params_dict("data/tiny")
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(dest, "git", "init", "-q")
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-q", "-m", "tiny project")
    shutil.copytree(migrated_prefect_home(), dest / ".tunedeck" / "prefect")  # .tunedeck/ is git-ignored
    return dest


def run(cwd: Path, *args: str, check: bool = True, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
    """Run a command in the project; on failure show its output. On a timeout its whole process group is killed
    (a hung `tunedeck demo` left DVC's queue running behind it, slowing every test after it)."""
    child = subprocess.Popen(list(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env(**extra), start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        raise AssertionError(f"{args} did not finish in {timeout:.0f} s\n{out[-3000:]}\n{err[-3000:]}") from None
    proc = subprocess.CompletedProcess(list(args), child.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def checkpoint_written(checkpoints: Path) -> bool:
    """Whether a run has written its first checkpoint under checkpoints/ (a folder per run key)."""
    return any(checkpoints.glob("*/last.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")  # the flow run states that never change again


def wait(url: str, run_id: str, timeout: float = 240) -> dict:
    """The flow run once it reads a final state; timeout is a hang guard only (a tiny pipeline run takes well
    under a minute), never a claim on speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        flow_run = api(url, "flow_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})[0]
        if flow_run["state_type"] in FINAL:
            return flow_run
        time.sleep(0.5)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout} s")


def api(url: str, path: str, body: dict | None = None, tries: int = 6, auth: str | None = None):
    """POST `body` to the Prefect REST API (as `auth`, "user:password", if given) and return the decoded reply.

    Retries 429/502/503 with backoff, as Prefect's own client does: a busy SQLite server answers
    503 ("database is locked") when several workers and runs write at once, notably on 2 cores.
    """
    data = json.dumps(body or {}).encode()
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    for attempt in range(tries):
        request = urllib.request.Request(f"{url}/{path}", data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code not in (429, 502, 503) or attempt == tries - 1:
                raise
        time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")
