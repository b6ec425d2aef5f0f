"""The run's device: a free GPU of its worker (a Prefect concurrency slot of 1 per GPU, held for the whole run), or the host's CPU."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from prefect import get_run_logger

from flows.contracts import LABEL
from flows.contracts.settings import Settings
from flows.gateways.gpus import cpu_slot_name, gpu_states, host, slot_name
from flows.run.labels import label_run
from flows.run.slot_lease import SlotLease
from flows.run.workspace import run_id

LEASE_SECONDS = 60  # the shortest lease Prefect allows; a killed run's slot is freed by its worker (flows.run.slot_lease)


@contextlib.contextmanager
def device_slot(settings: Settings, poll: float = 5.0) -> Iterator[dict[str, str]]:
    """Hold a free GPU of this worker (its gpus setting) for the run, or one of the host's CPU slots."""
    logger = get_run_logger()
    allowed = settings.gpus
    root = Path.cwd()  # the clone (flows.host.steps.checkout entered it): its worker frees a dead run's slot
    name = host(settings.host)
    if not allowed:
        with cpu_slot(settings.cpu_slots, name, root, poll) as env:
            yield env
        return
    wanted = [int(i) for i in allowed.split(",") if i.strip()]
    waited = False
    while True:
        for gpu in [g.index for g in gpu_states() if g.free and g.index in wanted]:
            slot = SlotLease(slot_name(gpu, name), f"GPU {gpu}", LEASE_SECONDS, logger, run_id(), root)
            if not slot.take():  # held by another run (a slot survives a server restart: flows.run.slot_lease)
                continue
            try:
                logger.info("holding GPU %d (%s)", gpu, slot_name(gpu, name))
                label_run({f"{LABEL}host": name, f"{LABEL}gpus": str(gpu)})
                yield {"CUDA_VISIBLE_DEVICES": str(gpu)}
            finally:
                slot.release()
            return
        if not waited:
            logger.info("all of GPUs %s are busy; waiting for one", allowed)
            waited = True
        time.sleep(poll)


@contextlib.contextmanager
def cpu_slot(slots: int, name: str, root: Path, poll: float) -> Iterator[dict[str, str]]:
    """Hold one of the host's CPU slots (the worker's --cpu-slots); with more than one, the run's share of the cores.

    Runs side by side on the CPU each get cores // slots threads (OMP_NUM_THREADS for the stages):
    threads of two runs fighting over the same cores are slower than each run on its own cores.
    """
    logger = get_run_logger()
    while True:
        for index in range(slots):
            lease = SlotLease(cpu_slot_name(index, name), "this host's CPU" + (f" (slot {index})" if slots > 1 else ""),
                              LEASE_SECONDS, logger, run_id(), root)
            if not lease.take():
                continue
            try:
                label_run({f"{LABEL}host": name})
                yield {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // slots))} if slots > 1 else {}
            finally:
                lease.release()
            return
        time.sleep(poll)
