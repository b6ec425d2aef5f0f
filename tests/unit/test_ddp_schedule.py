"""Under DDP only rank 0 validates; a plateau schedule must still step alike on every rank (2 gloo processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flows.core.distributed import World
from flows.core.params import TrainParams
from flows.core.trainer import make_scheduler, step_scheduler
from tests.integration.project import free_port

EPOCHS = 16  # timm's plateau waits 10 epochs without improvement, so the rate drops within these


def rank_learning_rates(rank: int, port: int, out: dict) -> None:
    """One rank: the Trainer's own schedule over EPOCHS epochs; rank 0 alone has a (flat) val accuracy."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = TrainParams(scheduler="plateau", epochs=EPOCHS, lr=0.1, warmup_epochs=0)
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
        scheduler = make_scheduler(optimizer, cfg)
        rates = []
        for epoch in range(EPOCHS):
            step_scheduler(scheduler, epoch, 0.5 if rank == 0 else None, World(rank, 2), torch.device("cpu"))
            rates.append(optimizer.param_groups[0]["lr"])
        out[rank] = rates
    finally:
        dist.destroy_process_group()


def test_a_plateau_step_leaves_every_rank_with_the_same_learning_rate():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(rank_learning_rates, args=(free_port(), out), nprocs=2, join=True)
        rates = dict(out)
    assert rates[0] == rates[1], rates
    assert rates[0][-1] < rates[0][0], f"the plateau never reduced the rate, so this proves nothing: {rates[0]}"
