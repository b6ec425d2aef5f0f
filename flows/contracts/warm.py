"""The warm stage server's socket protocol (flows.stages.warm): a stage hands its work over, then hears how it ended.

A stage's stand-in sends one WarmRequest line (with its stdin, stdout and stderr as SCM_RIGHTS);
the server answers with WarmStarted (the child that runs the stage) and, once the child is reaped,
WarmEnded (its exit status; 128 + N for a death by signal N). A child killed before it could say
hello gives WarmEnded first.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class WarmRequest(BaseModel):
    """The stage to run: its module (run as __main__), argv, working directory, environment and interpreter."""

    module: str
    argv: list[str]
    cwd: str
    env: dict[str, str]
    executable: str
    path0: str = ""
    """the stand-in's sys.path[0] (its working directory for `python -m`, the script's folder for `tunedeck`)"""
    orphaned: Literal["stop", "kill"] = "stop"
    """what the child does when its stand-in dies (even by SIGKILL): stop as a SIGTERM would (a pipeline run's stage
    says how it ended), or die at once, as a stage in its own process would (a stage run by hand)"""

    def line(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"


class WarmStarted(BaseModel):
    """The child that runs the stage (its stand-in forwards signals to it)."""

    pid: int

    def line(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"


class WarmEnded(BaseModel):
    """How the stage's child ended: its exit status."""

    exit: int

    def line(self) -> bytes:
        return self.model_dump_json().encode() + b"\n"
