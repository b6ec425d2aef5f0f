"""What a training run carries beside its modules, saved in a checkpoint and restored from one in one place.

The modules (model, optimizer, schedule, scaler, EMA) have their own state_dict; everything
else a resumed run needs to go on exactly where it stopped lives here: the optimizer step, the
micro-batch after any halving on OOM, the best weights so far, the epochs since they improved,
and every logged epoch (replayed to the tracker, whose files DVC removes before a stage runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Best:
    """The best weights so far: their score (val accuracy, else minus the train loss), epoch, which (raw or EMA)."""

    score: float = float("-inf")
    epoch: int = -1
    weights: str = "raw"
    state: dict[str, torch.Tensor] | None = None  # a CPU copy of the state_dict
    val_acc: float | None = None


@dataclass
class TrainState:
    """The run's counters and memory between steps (see the module's docstring)."""

    micro: int  # images per micro-batch (train.batch_size, halved on each OOM)
    accum: int  # micro-batches per optimizer step (doubled with each halving: the same effective batch)
    step: int = 0
    oom_events: int = 0
    since_best: int = 0
    best: Best = field(default_factory=Best)
    history: list[tuple[int, dict]] = field(default_factory=list)  # (epoch, metrics) of every logged epoch

    def improve(self, score: float, epoch: int, weights: str, module: torch.nn.Module, val_acc: float | None) -> bool:
        """Keep module's weights as the best when score beats the best so far; True when it did."""
        if score <= self.best.score:
            return False
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}
        self.best = Best(score, epoch, weights, state, val_acc)
        return True

    def to_checkpoint(self) -> dict:
        """The fields a checkpoint stores (the keys checkpoint format 2 has always had). By hand, not asdict(): that
        deep-copies, and the best weights would be copied once more at every checkpoint."""
        best = self.best
        return {"micro": self.micro, "accum": self.accum, "step": self.step, "oom_events": self.oom_events,
                "since_best": self.since_best, "history": self.history,
                "best": {"score": best.score, "epoch": best.epoch, "weights": best.weights, "state": best.state,
                         "val_acc": best.val_acc}}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> TrainState:
        return cls(micro=saved["micro"], accum=saved["accum"], step=saved["step"], oom_events=saved["oom_events"],
                   since_best=saved["since_best"], best=Best(**saved["best"]),
                   history=[tuple(item) for item in saved.get("history", [])])
