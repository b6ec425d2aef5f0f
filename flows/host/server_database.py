"""The shared server's database: a PostgreSQL URL the user names, checked before Prefect starts on it.

Prefect reads its database from ``PREFECT_SERVER_DATABASE_CONNECTION_URL`` (older name:
``PREFECT_API_DATABASE_CONNECTION_URL``). ``tunedeck server start --database URL`` sets it for
the server it starts; without either, the server keeps its SQLite file under ``.tunedeck/``.
A URL that is malformed, or a PostgreSQL that does not answer or refuses the login, is one
sentence saying what to fix, before a server is started that would only fail in its log.
"""

from __future__ import annotations

import asyncio
import os
import socket

from flows.core.errors import TunedeckError

SETTING = "PREFECT_SERVER_DATABASE_CONNECTION_URL"
OLD_SETTING = "PREFECT_API_DATABASE_CONNECTION_URL"
EXAMPLE = "postgresql+asyncpg://USER:PASSWORD@HOST:5432/DATABASE"
CONNECT_TIMEOUT_S = 5.0


def from_environment() -> tuple[str, str] | None:
    """The database URL Prefect's own settings name, and which variable named it; None for the default."""
    for name in (SETTING, OLD_SETTING):
        if os.environ.get(name):
            return os.environ[name], name
    return None


def masked(url: str) -> str:
    """The URL with its password hidden, for messages and `tunedeck server status`."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a URL>"


def check(url: str, source: str = "--database") -> str:
    """Check that url is a PostgreSQL (asyncpg) or SQLite (aiosqlite) URL Prefect can use, and that the
    PostgreSQL behind it accepts the login; return a short description ("PostgreSQL at host:port/db")."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise TunedeckError(f"{source} is not a database URL: write it as {EXAMPLE}.") from None
    if parsed.drivername == "sqlite+aiosqlite":
        return f"SQLite at {parsed.database}"
    if parsed.drivername.split("+")[0] not in ("postgresql", "postgres"):
        raise TunedeckError(f"{source} names a {parsed.drivername} database: Prefect runs on PostgreSQL "
                            f"({EXAMPLE}) or, without {source}, on SQLite under .tunedeck/.")
    if parsed.drivername != "postgresql+asyncpg":
        raise TunedeckError(f"{source} uses the driver '{parsed.drivername}': Prefect's server needs asyncpg, "
                            f"so write it as {EXAMPLE}.")
    if not parsed.host or not parsed.database:
        raise TunedeckError(f"{source} ({masked(url)}) lacks a host or a database name: write it as {EXAMPLE}.")
    where = f"PostgreSQL at {parsed.host}:{parsed.port or 5432}"
    asyncio.run(_login(parsed, where, source))
    return f"{where}/{parsed.database}"


async def _login(parsed, where: str, source: str) -> None:
    """Open and close one connection as the URL's user; each way it can fail is one sentence."""
    import asyncpg

    user, database = parsed.username or os.environ.get("USER", "?"), parsed.database
    try:
        connection = await asyncpg.connect(
            host=parsed.host, port=parsed.port or 5432, user=parsed.username, password=parsed.password,
            database=database, timeout=CONNECT_TIMEOUT_S,
        )
    except socket.gaierror:
        raise TunedeckError(f"the host '{parsed.host}' in {source} is not known: fix the host name in the URL.") from None
    except TimeoutError:
        raise TunedeckError(f"{where} did not answer within {CONNECT_TIMEOUT_S:.0f} s: check that it runs and that a "
                            f"firewall lets this host reach it, or fix the host and port in {source}.") from None
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        raise TunedeckError(f"{where} refused the login of user '{user}' (wrong password, no such role, or no "
                            f"pg_hba.conf line for this host): fix the user and password in {source}, or create "
                            f"the role with `createuser --pwprompt {user}`.") from None
    except asyncpg.InvalidCatalogNameError:
        raise TunedeckError(f"the database '{database}' does not exist on {where}: create it with "
                            f"`createdb -O {user} {database}`, or name another in {source}.") from None
    except asyncpg.PostgresError as exc:
        raise TunedeckError(f"{where} refused the connection ({exc}): fix {source} or the server's settings.") from None
    except OSError as exc:
        reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else exc.strerror or str(exc)
        raise TunedeckError(f"{where} does not answer ({reason}): start PostgreSQL there (`systemctl start "
                            f"postgresql` or `pg_ctlcluster VERSION main start`) or fix the host and port in {source}.") from None
    await connection.close()


def start_failure(log_text: str, description: str) -> str | None:
    """A sentence for a server that exited at start because of its PostgreSQL, from its log; None otherwise."""
    if "permission denied for schema public" in log_text or "must be owner of" in log_text:
        return (f"the Prefect server may not create its tables in {description}: make the user the database's "
                "owner (`ALTER DATABASE name OWNER TO user`) and start it again.")
    if "pg_trgm" in log_text and ("permission denied" in log_text or "could not open extension" in log_text):
        return (f"the Prefect server could not create the pg_trgm extension in {description}: install the "
                "PostgreSQL contrib package, or run `CREATE EXTENSION pg_trgm` there as a superuser.")
    return None
