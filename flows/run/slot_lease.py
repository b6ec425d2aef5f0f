"""A GPU (or CPU) slot held for a run's whole length, through an outage or a restart of the Prefect server.

Prefect's `concurrency()` renews its slot's lease from a thread that gives up after three tries
a few seconds apart, then ends the run (strict) or lets the slot lapse (not strict). A server
restarted half a minute after a `kill -9` so ended hours of training as Crashed (issue 28).
This holder renews every RENEW_FRACTION of the lease, keeps trying while the server does not
answer, and, when the server no longer knows the lease (it ran out and was revoked while the
server was away), takes the slot again at once; either way it logs one line that says so.
The local server keeps its leases on disk (flows.host.server), so a restart alone loses none; the
guarantee that two runs never share a slot stays the server's (a slot is only ever taken by an
increment that the server grants).

A run's lease id is also written under its clone (`.tunedeck/leases/RUN.SLOT`): when a run's
processes are killed, `tunedeck worker` sees them gone and frees the slot at once (release_dead),
so the rerun takes its GPU in seconds, not after the lease runs out (measured: a rerun after
kill -9 waited about 75 s for its GPU).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from uuid import UUID

import httpx

from flows.gateways import prefect_api

RENEW_FRACTION = 1 / 6  # renew every 10 s of a 60 s lease: an outage up to ~50 s keeps the very same lease
RETRY_S = 2.0  # while the server does not answer, or the slot is someone else's
GONE = 410  # the server's answer: no such lease


class SlotLease:
    """One slot of one Prefect global concurrency limit, leased and kept; `take()` once, then `release()`."""

    def __init__(self, name: str, what: str, lease_s: float, logger, run_id: str | None = None,
                 root: Path | None = None) -> None:
        self.name, self.what, self.lease_s, self.logger = name, what, lease_s, logger
        self.run_id = run_id
        self.record = lease_file(root, run_id, name) if root is not None and run_id else None
        self.lease_id: UUID | None = None
        self._said_taken = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"tunedeck-slot-{name}", daemon=True)

    def take(self) -> bool:
        """Try once: True when the slot is now ours (renewed from then on), False when it is taken."""
        if not self._increment():
            return False
        self._thread.start()
        return True

    def release(self) -> None:
        """Stop renewing and free the slot; a server that is down lets the lease run out instead."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lease_id is None:
            return
        try:
            prefect_api.release_slot(self.lease_id)
        except (httpx.HTTPError, OSError) as exc:
            self.logger.warning(f"{self.what}'s slot could not be freed ({type(exc).__name__}); "
                                f"it frees itself within {self.lease_s:.0f} s")
        if self.record is not None:
            self.record.unlink(missing_ok=True)

    def _increment(self) -> bool:
        """One request for the slot; its lease id kept when granted."""
        lease_id = prefect_api.take_slot(self.name, self.lease_s, self.run_id)
        if lease_id is None:
            return False
        self.lease_id = lease_id
        if self.record is not None:  # through a rename: a worker reading it never sees half an id
            self.record.parent.mkdir(parents=True, exist_ok=True)
            partial = self.record.with_name(f".{self.record.name}.{os.getpid()}")
            partial.write_text(str(self.lease_id))
            partial.replace(self.record)
        return True

    def _renew(self) -> None:
        prefect_api.renew_slot(self.lease_id, self.lease_s)

    def _keep(self) -> None:
        """Renew until release(); through an outage, keep trying; a lease the server lost, take again."""
        away_since: float | None = None  # when the server first failed to renew (None: all is well)
        lost = False  # the lease is gone and the slot is not ours again yet
        while not self._stop.wait(self.lease_s * RENEW_FRACTION if away_since is None else RETRY_S):
            try:
                if lost:
                    if not self._increment():
                        self._taken_meanwhile()
                        continue
                    self._say(away_since, "re-taken")
                else:
                    self._renew()
                    if away_since is not None:
                        self._say(away_since, "kept")
                away_since, lost = None, False
            except httpx.HTTPStatusError as exc:
                away_since = away_since or time.monotonic()
                if exc.response.status_code == GONE and not lost:
                    lost = True
                    self.logger.warning(f"the server no longer holds {self.what}'s slot for this run; taking it again")
            except (httpx.HTTPError, OSError):
                away_since = away_since or time.monotonic()

    def _taken_meanwhile(self) -> None:
        """Said once: another run was granted the slot while this one's lease was gone; both now use the device."""
        if not self._said_taken:
            self._said_taken = True
            self.logger.warning(f"{self.what}'s slot was given to another run while the server was away; this run "
                                "goes on and takes the slot back as soon as it is free")

    def _say(self, away_since: float | None, how: str) -> None:
        away = time.monotonic() - away_since if away_since is not None else 0.0
        self.logger.warning(f"the server was unreachable for {away:.0f} s; {self.what}'s slot was {how} "
                            "and the run went on")


LEASES = Path(".tunedeck") / "leases"


def lease_file(root: Path, run_id: str, slot: str) -> Path:
    """Where a run of the clone at root records the lease of one slot it holds."""
    return root / LEASES / f"{run_id}.{slot}"


def release_dead(root: Path, run_id: str) -> list[str]:
    """Free the slots a run of the clone at root held, once its processes are gone; the slots freed.

    Only for a run known dead (the worker saw every process of it end): a live run's slot must
    never be freed under it. A slot the server no longer knows (it ran out) is freed all the same.
    """
    freed = []
    for record in sorted((root / LEASES).glob(f"{run_id}.*")):
        try:
            prefect_api.release_slot(UUID(record.read_text().strip()))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in (GONE, 404):
                continue  # the server is busy: the next look frees it
        except (httpx.HTTPError, OSError, ValueError):
            continue
        record.unlink(missing_ok=True)
        freed.append(record.name.split(".", 1)[1])
    return freed
