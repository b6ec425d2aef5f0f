"""Data-parallel training across processes (torchrun DDP): NCCL on GPUs, gloo on the CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes outputs, checkpoints and logs."""
        return self.rank == 0


def current_world() -> World:
    """The world torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def init(world: World, device: torch.device) -> None:
    """Join the process group when there is more than one process."""
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown(world: World) -> None:
    """Leave the process group."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: float, world: World, device: torch.device) -> float:
    """Sum a number over every process."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_flag(flag: bool, world: World, device: torch.device) -> bool:
    """Rank 0's decision, seen by every process (e.g. early stopping)."""
    if world.size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def broadcast_value(value: float | None, world: World, device: torch.device) -> float | None:
    """Rank 0's number (None where it has none), seen by every process.

    Only rank 0 validates: a schedule that steps on the validation metric (plateau) must step on
    rank 0's figure everywhere, or the ranks' learning rates part ways."""
    if world.size == 1:
        return value
    t = torch.tensor([float("nan") if value is None else value], dtype=torch.float64, device=device)
    dist.broadcast(t, 0)
    return None if torch.isnan(t).item() else float(t.item())


def interface_of(address: str) -> str | None:
    """The network interface that holds address (gloo must talk on it, not on whatever the hostname resolves to)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == address for a in addrs):
            return name
    return None
