"""Warm stage processes: a pipeline run's stages start with torch and timm already imported.

Every stage is its own process (`python -m flows.stages.<name>`, as dvc.yaml says), and each
train, evaluate and export process spent about 2.7 s of this 2-core CPU importing torch, timm
and torchvision (torchvision pulls in torch._dynamo: 1.1 s alone) before doing any work.

A pipeline run starts one server per run (`WarmStages`), which imports those libraries once,
runs no torch op (so no thread pool and no CUDA state exists to break in a fork), and waits on
a unix socket. A stage process that finds `TUNEDECK_WARM` in its environment hands its argv,
working directory, environment and its stdin/stdout/stderr (SCM_RIGHTS) to the server, which
forks a child that runs the stage module as `__main__` there. The stage process stays as the
child's stand-in: DVC and the tests see the same command, output and exit status; a SIGTERM or
SIGINT it gets goes to the child; if it dies (even by SIGKILL) the child is terminated too.

A stage that DVC runs outside a pipeline run (a plain `dvc repro` or `dvc exp run`) uses its
project's own server in the same way (`hand_over`): the first torch stage starts it (detached, in
a session of its own, no file of the stage's held open), later stages find it at a socket named
after the project's folder and the Python, and it exits after BY_HAND_IDLE_S with nothing to do.
There a stand-in killed even by SIGKILL takes its child with it at once, as a stage in its own
process would die. The `tunedeck` commands that import torch (predict, monitor, promote, ...)
use it too. A project's server is Linux's only (a fork after importing torch is not safe on
macOS). A stage not run by DVC (`python -m flows.stages.train` typed by hand, the tests' direct
calls), a DDP rank, `TUNEDECK_WARM=off`, or a server that cannot be reached: the stage runs in
its own process, as before: only slower, never different. Every server's socket is its user's
alone (mode 0700), and it serves no other user (SO_PEERCRED).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
import types
from pathlib import Path
from subprocess import DEVNULL

from pydantic import TypeAdapter

from flows.contracts.settings import Settings, variable
from flows.contracts.warm import WarmEnded, WarmRequest, WarmStarted
from flows.gateways import processes

ENV = variable("warm")
"""The setting that carries this run's warm server's socket; stage processes that have it hand their work over."""
PRELOAD = ("numpy", "PIL.Image", "torch", "torchvision", "timm", "timm.data", "timm.optim", "timm.scheduler", "safetensors.torch")
"""What the server imports once: the libraries every torch stage imports first."""
FIRST_REPLY = TypeAdapter(WarmStarted | WarmEnded)
"""The server's first line to a stand-in: the child that runs the stage, or its end if it died before saying so."""
CHILD = "tunedeck_warm_child"
"""A warm child has a module of this name in sys.modules (not a flows.* one: the child drops those): a stage that
ends asks it (flows.stages.entry.finish), to end through SystemExit, which the child reports to its stand-in."""
IDLE_S = 900.0
"""A server with nothing to do for this long exits (the run that started it stops it sooner)."""
BY_HAND_IDLE_S = 120.0
"""A project's server (stages of a plain `dvc repro`) exits after this long with nothing to do: long enough for the
next stage of the same repro, or the next `dvc repro` soon after; short enough that a library upgraded in the
virtual environment is what the next stage imports."""
OFF = "off"
"""The warm setting that keeps every stage in its own process."""
IMPORT_ENV = ("HF_", "HUGGINGFACE_", "TORCH", "PYTORCH", "TIMM", "XDG_", "PYTHON", "CUDA_", "LD_")
"""The variables the preloaded libraries may read as they import: a project's server is one per set of their values."""
BIND_WAIT_S = 5.0
"""How long a stage that started its project's server waits for it to listen (it binds before importing)."""


# ---- the stage's side --------------------------------------------------------------------------


def hand_over(settings: Settings, command: str | None = None) -> int | None:
    """Run this stage process's work (or, with command, this `tunedeck` command's: its module) in a warm server, if
    it has one (see the module's doc): its exit status, or None to run here."""
    if settings.warm == OFF or CHILD in sys.modules:
        return None
    if settings.warm:
        return delegate(settings.warm, module=command)
    if sys.platform != "linux" or (command is None and ("DVC_STAGE" not in os.environ or "RANK" in os.environ)):
        return None  # not Linux (a fork after importing torch is not safe on macOS), a stage not run by DVC, a DDP rank
    path = project_socket(Path.cwd())
    status = delegate(str(path), orphaned="kill", module=command)
    if status is None and start_project_server(path):
        status = delegate(str(path), orphaned="kill", module=command)
    return status


def project_socket(project: Path, environ: dict[str, str] | None = None) -> Path:
    """The socket of the project's own warm server: one per folder, Python and the variables its imports read
    (IMPORT_ENV: huggingface_hub reads its cache folders and offline flag at import, so a command with others gets a
    server of its own). A unix socket's path is limited to 107 bytes: it is named by a digest, in the temporary
    folder."""
    import hashlib
    import tempfile

    read = sorted((k, v) for k, v in (os.environ if environ is None else environ).items() if k.startswith(IMPORT_ENV))
    digest = hashlib.sha256(repr((str(project.resolve()), sys.executable, read)).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tunedeck-warm-{os.getuid()}-{digest}.sock"


def start_project_server(path: Path) -> bool:
    """Start the project's warm server at path (none answered there), detached: it outlives this stage, on purpose,
    for the next. It imports with the default threads (a stage that sets OMP_NUM_THREADS sets its child's). Whether
    it listens within BIND_WAIT_S."""
    if _listens(path):
        return False  # a live server refused this request (another Python, a peer it does not serve): keep it
    with contextlib.suppress(OSError):
        path.unlink()  # a server killed without its cleanup left its socket file: nothing listens there
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DVC_STAGE", ENV)}
    processes.spawn([sys.executable, "-m", "flows.stages.warm", str(path), str(BY_HAND_IDLE_S)], tie=False, group=True,
                    cwd="/", env=env, stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
    deadline = time.monotonic() + BIND_WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _listens(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def delegate(path: str, orphaned: str = "stop", module: str | None = None) -> int | None:
    """Run this stage process's module (or module) in the warm server at path (the process's warm setting), if there
    is one; its exit status, or None to run here."""
    main = sys.modules.get("__main__")
    module = module or getattr(getattr(main, "__spec__", None), "name", None)
    if not path or not module:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        env = {**os.environ, ENV: OFF}  # the stage's own children run plainly
        request = WarmRequest(module=module, argv=sys.argv, cwd=os.getcwd(), env=env, executable=sys.executable,
                              orphaned=orphaned, path0=sys.path[0])
        socket.send_fds(conn, [request.line()], [0, 1, 2])
        reader = conn.makefile("rb")
        first = FIRST_REPLY.validate_json(reader.readline())
    except (OSError, ValueError):
        conn.close()
        return None  # no server (it ended, never started, or refused this Python): this process does the work itself
    if isinstance(first, WarmEnded):  # the child died before it could say hello (killed at once): the stage's end
        conn.close()
        return first.exit
    processes.forward(first.pid)
    status = 1
    for line in reader:  # the child's exit status, sent by the server once the child is gone
        with contextlib.suppress(ValueError):
            status = WarmEnded.model_validate_json(line).exit
            break
    else:
        status = 128 + signal.SIGKILL  # the server and the child are gone without a word
    conn.close()
    return status


# ---- the server's side -------------------------------------------------------------------------


def serve(path: str, idle_s: float = IDLE_S) -> None:
    """Import PRELOAD, then fork a child for each stage that connects to path, until idle for idle_s or told to stop.

    The socket is bound first: a stage that connects while the imports run waits in the backlog
    for them to finish (less than starting its own), instead of finding no server. Another server already
    listening at path (two stages started one at once): this one leaves.
    """
    import importlib
    import warnings

    signal.signal(signal.SIGTERM, stop_handler(path, os.getpid()))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mask = os.umask(0o077)  # the socket is its user's alone: whoever may connect runs code as this user
    try:
        listener.bind(path)
    except OSError:
        return
    finally:
        os.umask(mask)
    listener.listen(8)
    listener.setblocking(False)
    children = processes.Children()  # each child's connection to its stand-in, kept to report the child's end
    children.watch(listener)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in PRELOAD:
                with contextlib.suppress(ImportError):
                    importlib.import_module(name)
        last = time.monotonic()
        while children or time.monotonic() - last < idle_s:
            ready = children.select(timeout=0.5)
            _report(children)
            if listener not in ready:
                continue
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue  # the stage that knocked went away
            last = time.monotonic()
            with contextlib.suppress(OSError, ValueError):
                pid = _start(conn, listener)
                if pid:
                    children.add(pid, conn)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


def stop_handler(path: str, server: int):
    """The server's SIGTERM handler: told to stop (the run is over), it goes now, its socket removed. An interpreter
    that imported torch takes about a second to tear itself down, and the run waits for this process to be gone
    (measured: 0.95 s of a run's end, py-spy). A child forked a moment ago has this handler until it takes the
    default back: there a SIGTERM ends the child (its stand-in hears 1), never the server's socket."""

    def handler(*_) -> None:
        if os.getpid() != server:
            sys.exit(0)  # caught in _start: the child ends with status 1
        with contextlib.suppress(OSError):
            os.unlink(path)
        os._exit(0)

    return handler


def _report(children: processes.Children) -> None:
    """Tell the stand-in of each child that ended how it ended. Only here, once the child is reaped: a stage whose
    stand-in returned has no process left (its memory, a GPU's too, is free for the next stage; a child that said
    its status itself was still tearing down when CI looked, 986003c)."""
    for conn, code in children.reap():
        with contextlib.suppress(OSError):
            conn.sendall(WarmEnded(exit=code).line())
        conn.close()


def _start(conn: socket.socket, listener: socket.socket) -> int | None:
    """Fork the child that runs one stage; the server keeps its end of conn to report the child's end.

    A stage of another Python (another virtual environment) is refused: it runs in its own process. So is anyone
    but this server's own user (the socket is theirs alone too: serve).
    """
    conn.settimeout(10)
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    request = WarmRequest.model_validate_json(message)
    if request.executable != sys.executable or len(fds) != 3 or not _same_user(conn):
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        conn.settimeout(None)
        return pid
    try:  # the child: never returns
        listener.close()
        code = _run_child(conn, request, fds)
    except BaseException:  # noqa: BLE001 - the child must not fall back into the server's loop
        import traceback

        traceback.print_exc()
        code = 1
    _exit(conn, code)
    raise AssertionError  # unreachable


def _same_user(conn: socket.socket) -> bool:
    """Whether the process at the other end of conn runs as this one's user (Linux: SO_PEERCRED; elsewhere the
    socket file's mode alone guards it)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return True
    import struct

    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid == os.getuid()


def _run_child(conn: socket.socket, request: WarmRequest, fds: list[int]) -> int:
    """Become the stage: its stdio, directory, environment and argv; run its module as __main__."""
    import io
    import runpy

    os.setpgid(0, 0)  # signals reach it through its stand-in only (a terminal's Ctrl-C would otherwise come twice)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True)
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    if (threads := os.environ.get("OMP_NUM_THREADS", "")).isdigit() and int(threads) > 0:
        import torch  # imported by the server: a cold process reads OMP_NUM_THREADS at that import, a fork must be told

        torch.set_num_threads(int(threads))
    for name in [m for m in sys.modules if m == "flows" or m.startswith("flows.")]:
        del sys.modules[name]  # the stage's code is its workspace's, not the server's
    sys.path[0] = request.path0 or request.cwd  # where the stand-in imports from: its folder for -m, a script's own
    sys.argv = list(request.argv)
    sys.modules[CHILD] = types.ModuleType(CHILD)
    conn.settimeout(None)
    conn.sendall(WarmStarted(pid=os.getpid()).line())
    threading.Thread(target=_watch, args=(conn, request.orphaned == "kill"), daemon=True).start()
    try:
        runpy.run_module(request.module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        return 130
    return 0


def _watch(conn: socket.socket, kill: bool) -> None:
    """The stand-in closed its end (it died, even by SIGKILL): stop as its SIGTERM would, then for good (kill: at
    once)."""
    with contextlib.suppress(OSError):
        while conn.recv(4096):
            pass
    if kill:
        processes.send(os.getpid(), signal.SIGKILL)
    processes.send(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    processes.send(os.getpid(), signal.SIGKILL)


def _exit(conn: socket.socket, code: int) -> None:
    """End the child: its status reaches the stand-in through the server, which reaps it (_reap)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


class WarmStages:
    """One warm server for a pipeline run: `with WarmStages() as warm:` starts it early (it imports while the run
    sets up) and stops it at the end; warm.env() for the stages."""

    def __enter__(self) -> WarmStages:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __init__(self, folder: Path | None = None) -> None:
        import tempfile

        folder = folder or Path(tempfile.gettempdir())  # a unix socket's path is limited to 107 bytes
        self.path = folder / f"tunedeck-warm-{os.getpid()}-{id(self):x}.sock"
        self.proc: processes.Helper | None = None

    def start(self) -> WarmStages:
        self.proc = processes.spawn([sys.executable, "-m", "flows.stages.warm", str(self.path)], tie=True,
                                    stdin=DEVNULL, stdout=DEVNULL, stderr=DEVNULL)
        return self

    def socket_path(self) -> str:
        """The warm setting that sends stages here; empty once the server is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        return str(self.path)

    def env(self) -> dict[str, str]:
        """The variable that sends stages here (a test's stage process); empty once the server is gone."""
        return Settings(warm=self.socket_path()).env()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(grace_s=10)
        with contextlib.suppress(OSError):
            self.path.unlink()


if __name__ == "__main__":
    serve(sys.argv[1], *(float(a) for a in sys.argv[2:3]))
    os._exit(0)  # idle: gone now, not after a second of unwinding torch
