"""A real PostgreSQL for tests and benches: a fresh database, dropped afterwards.

Where .ci/run started one it exports ``TUNEDECK_TEST_POSTGRES_URL`` (a role that may create
databases). Elsewhere (a dev machine with PostgreSQL's binaries but no service, or a CI machine
where the service would not start) a throwaway cluster is made with ``initdb`` and ``pg_ctl``
in a temp folder, on a free port of 127.0.0.1, and removed afterwards. PostgreSQL refuses to run
as root, so under root it runs as the ``postgres`` user the Debian package creates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.integration.project import free_port

ENV = "TUNEDECK_TEST_POSTGRES_URL"
USER = "tunedeck"


def binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def unavailable() -> str | None:
    """Why no PostgreSQL can be had here (a reason to skip), or None."""
    if os.environ.get(ENV):
        return None
    if binaries() is None:
        return f"no PostgreSQL: set {ENV} or install it (apt-get install postgresql); .ci/run does"
    if os.geteuid() == 0 and not _user_exists("postgres"):
        return "PostgreSQL cannot run as root and there is no 'postgres' user to run it as"
    return None


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _as_owner(args: list[str]) -> list[str]:
    """args run as the postgres user when we are root (PostgreSQL refuses root)."""
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *args] if os.geteuid() == 0 else args


@contextlib.contextmanager
def throwaway_cluster(durable: bool = False) -> Iterator[str]:
    """A new cluster on a free port, its superuser's URL; stopped and removed on exit.

    Tests turn durability off (fsync, synchronous commit) to be quick; a bench keeps the defaults.
    """
    bin_dir, folder = binaries(), Path(tempfile.mkdtemp(prefix="tunedeck-pg-"))
    password, port = secrets.token_hex(12), free_port()
    if os.geteuid() == 0:
        os.chown(folder, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
    (folder / "pw").write_text(password)
    if os.geteuid() == 0:
        shutil.chown(folder / "pw", "postgres", "postgres")
    data, log = folder / "data", folder / "log"
    subprocess.run(_as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
                              f"--pwfile={folder / 'pw'}", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    if not durable:
        options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    pg_ctl = str(bin_dir / "pg_ctl")
    subprocess.run(_as_owner([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]),
                   check=True, capture_output=True)
    try:
        yield f"postgresql+asyncpg://{USER}:{password}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_owner([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _admin(url: str, *statements: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(_plain(url), timeout=10)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on admin_url's server (its role may create databases); dropped on exit."""
    name = f"tunedeck_{secrets.token_hex(4)}"
    asyncio.run(_admin(admin_url, f"CREATE DATABASE {name}"))
    base, _, _ = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_admin(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@contextlib.contextmanager
def postgres_database(durable: bool = False) -> Iterator[str]:
    """A fresh database: on the server TUNEDECK_TEST_POSTGRES_URL names, else on a throwaway cluster."""
    shared = os.environ.get(ENV)
    with contextlib.ExitStack() as stack:
        admin = shared or stack.enter_context(throwaway_cluster(durable))
        yield stack.enter_context(fresh_database(admin))
