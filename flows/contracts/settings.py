"""tunedeck's own settings: every TUNEDECK_* variable, typed, in one model.

A process reads them once, at its entry (`Settings.read()`: the `tunedeck` command, a stage's main,
a deployment run's first step and its flow, a helper's main), and passes them down; nothing else
reads a TUNEDECK_* variable (tests/unit/test_floor_plan.py), none in the ML core. A process that
starts another hands them on in its environment (`env()`), which is what the other reads at its
entry. A bad value is one sentence naming the variable and what it takes.

The variables, for a person: docs/reference/cli.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flows.core.errors import TunedeckError

PREFIX = "TUNEDECK_"
HEARTBEAT_S = 30
"""A run's heartbeat period (Prefect's shortest); zombie_after_s must exceed it."""


class Settings(BaseModel):
    """One process's settings; each field is the variable TUNEDECK_<FIELD>."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prefect: Literal["auto", "off", "required"] = "auto"
    """a stage's flow run: when a server is up (auto), never (off, benchmarks), or a missing server is an error"""
    progress: Literal["", "lines"] = ""
    """lines: a stage prints its progress as marked lines (its pipeline run reads them)"""
    warm: str = ""
    """the socket of the run's warm stage server (flows.stages.warm): stages hand their work over; off: every stage
    in its own process; unset: a stage DVC runs (`dvc repro`) uses its project's own warm server, started if none is up"""
    checkpoints: Path | None = None
    """where checkpoints go (a run's workspace points it at its clone's); else checkpoints/ of the project"""
    checkpoint_remote: bool | None = None
    """off: a run's checkpoints are not copied to the DVC remote each epoch (unset: they are, but in the demo)"""
    cpu_bf16: bool | None = None
    """1 or 0: whether this CPU computes bf16 natively (else its flags say)"""
    gpus: str = ""
    """the GPUs this worker hands its runs (comma-separated indices); empty: the CPU"""
    cpu_slots: int = Field(1, ge=1)
    """a CPU worker's runs at once"""
    host: str = ""
    """this host's name in slots and telemetry (else the hostname)"""
    project: Path | None = None
    """the clone a worker's runs use"""
    git_pull: bool = False
    """a worker pulls its clone (git pull --ff-only) before each run"""
    zombie_after_s: int = Field(180, gt=HEARTBEAT_S)
    """seconds without a heartbeat before the server marks a run Crashed (read by `tunedeck deploy`)"""
    # the default: six missed heartbeats, so a slow or busy host is never taken for a dead one. It was three (90 s),
    # and a live run on a loaded 2-core box (CI on d89e8e2, seed 93616: two test workers, two servers, four
    # trainings) went 90 s with no heartbeat reaching the server's trigger and was marked Crashed while it trained
    ddp_join_s: int = Field(300, gt=0)
    """how long node 0 waits for the other hosts of a run over several hosts"""
    node_addr: str = ""
    """this host's address towards the other nodes (else the route's)"""
    ddp_nodes: int | None = Field(None, ge=1)
    ddp_node_rank: int | None = Field(None, ge=0)
    ddp_master: str = ""
    """a run over several hosts: this host's place (flows.contracts.placement), set by the run that placed it"""
    price_per_hour: float | None = Field(None, ge=0)
    """what a device-hour of this host costs (a worker's --price-per-hour): each run's cost (flows.gateways.power)"""
    silo_data: Path | None = None
    """a federated silo's images, which never leave its host"""

    @field_validator("prefect", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The settings environ (this process's environment) carries; an empty variable is an unset one."""
        environ = os.environ if environ is None else environ
        values = {name: environ[variable(name)] for name in cls.model_fields
                  if environ.get(variable(name), "").strip()}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            error = exc.errors()[0]
            name = str(error["loc"][0])
            raise TunedeckError(f"{variable(name)} is '{values.get(name)}': {_takes(name, error['msg'])}.") from None

    def env(self) -> dict[str, str]:
        """These settings as the variables a child process reads at its entry (those not at their default)."""
        out = {}
        for name, value in self.model_dump(exclude_defaults=True).items():
            out[variable(name)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """A child process's whole environment: base (this process's) with these settings in place of its own."""
        base = os.environ if base is None else base
        ours = {variable(name) for name in Settings.model_fields}
        return {**{k: v for k, v in base.items() if k not in ours}, **self.env()}

    def but(self, **changes: object) -> Settings:
        """A copy with changes, checked (what a process hands a child that must differ)."""
        return Settings.model_validate({**self.model_dump(), **changes})


def variable(name: str) -> str:
    return PREFIX + name.upper()


def _takes(name: str, message: str) -> str:
    """What the variable takes, for a person."""
    if name == "prefect":
        return "use auto, off or required"
    if name == "progress":
        return "use lines, or leave it unset"
    if name in ("checkpoint_remote", "git_pull", "cpu_bf16"):
        return "use 1 or 0 (on or off)"
    if name == "price_per_hour":
        return "use a price per device-hour, 0 or more (e.g. 2.5)"
    if name == "zombie_after_s":
        return f"use a whole number of seconds above {HEARTBEAT_S} (the heartbeat period)"
    return message[0].lower() + message[1:]
