"""TrainState: what a run carries beside its modules goes through a checkpoint file and comes back equal."""

from __future__ import annotations

import torch
from torch import nn

from flows.core import checkpoint as ckpt
from flows.core.train_state import TrainState


def test_a_train_state_comes_back_from_a_checkpoint_file_equal(tmp_path):
    model = nn.Linear(3, 2)
    state = TrainState(micro=4, accum=2, step=17, oom_events=1, since_best=2,
                       history=[(0, {"train/loss": 1.5}), (1, {"train/loss": 1.25, "val/acc": 0.5})])
    assert state.improve(0.5, 1, "ema", model, 0.5)
    ckpt.save(tmp_path, {"run_key": "k", **state.to_checkpoint()})
    back = TrainState.from_checkpoint(ckpt.load_resumable(tmp_path, "k"))
    assert (back.micro, back.accum, back.step, back.oom_events, back.since_best) == (4, 2, 17, 1, 2)
    assert back.history == state.history
    assert (back.best.score, back.best.epoch, back.best.weights, back.best.val_acc) == (0.5, 1, "ema", 0.5)
    assert back.best.state.keys() == model.state_dict().keys()
    assert all(torch.equal(back.best.state[k], v) for k, v in model.state_dict().items())


def test_the_best_weights_are_a_copy_kept_only_when_the_score_improves():
    model = nn.Linear(3, 2)
    state = TrainState(micro=8, accum=1)
    assert state.improve(0.4, 0, "raw", model, 0.4)
    kept = state.best.state["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on: the kept copy must not follow
    assert torch.equal(state.best.state["weight"], kept)
    assert not state.improve(0.4, 1, "raw", model, 0.4), "a tie is not an improvement"
    assert state.best.epoch == 0 and torch.equal(state.best.state["weight"], kept)
    assert state.improve(0.6, 2, "raw", model, 0.6) and state.best.epoch == 2
