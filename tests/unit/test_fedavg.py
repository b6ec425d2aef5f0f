"""FedAvg's averaging, FedBN and the non-IID split (flows.core.fedavg): pure functions, no server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flows.core.fedavg import batchnorm_keys, dirichlet_split, iid_split, keep_local, weighted_average


def small_net(seed: int, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3), *([nn.BatchNorm2d(4)] if bn else []), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


def test_averaging_identical_models_returns_the_same_model():
    state = small_net(0).state_dict()
    state["1.num_batches_tracked"].fill_(7)
    averaged = weighted_average([state, state, state], [5, 1, 9])
    assert averaged.keys() == state.keys()
    for key, tensor in state.items():
        assert averaged[key].dtype == tensor.dtype
        assert torch.equal(averaged[key], tensor), key


def test_counts_1_and_3_match_a_hand_computation():
    a = {"w": torch.tensor([0.0, 4.0, -2.0]), "b": torch.tensor(1.0, dtype=torch.float16)}
    b = {"w": torch.tensor([4.0, 0.0, 2.0]), "b": torch.tensor(5.0, dtype=torch.float16)}
    averaged = weighted_average([a, b], [1, 3])
    # (1 * a + 3 * b) / 4
    assert torch.equal(averaged["w"], torch.tensor([3.0, 1.0, 1.0]))
    assert averaged["b"].dtype == torch.float16 and averaged["b"].item() == 4.0


def test_integer_buffers_are_the_rounded_weighted_mean_in_their_own_dtype():
    a = {"n": torch.tensor(10, dtype=torch.int64)}
    b = {"n": torch.tensor(20, dtype=torch.int64)}
    assert weighted_average([a, b], [1, 3])["n"].item() == 18  # 17.5 -> 18 (round half to even)
    assert weighted_average([a, b], [1, 2])["n"].item() == 17  # 16.67 -> 17
    out = weighted_average([a, b], [2, 1])["n"]
    assert out.dtype == torch.int64 and 10 <= out.item() <= 20


def full_batch_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """One step of plain gradient descent on the mean loss over all of (x, y)."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_fedavg_round_equals_one_centralised_full_batch_step():
    """No BatchNorm, full-batch GD, one local step: the example-weighted mean of the silos' steps is the pooled step."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 3, 6, 6, generator=gen), torch.randint(0, 3, (30,), generator=gen)
    start = small_net(3, bn=False).state_dict()
    silos = [slice(0, 4), slice(4, 13), slice(13, 30)]  # unequal sizes: the weights matter
    states = []
    for part in silos:
        model = small_net(0, bn=False)
        model.load_state_dict(start)
        states.append(full_batch_step(model, x[part], y[part], lr=0.5))
    averaged = weighted_average(states, [s.stop - s.start for s in silos])
    central = small_net(0, bn=False)
    central.load_state_dict(start)
    pooled = full_batch_step(central, x, y, lr=0.5)
    for key in pooled:
        assert torch.allclose(averaged[key], pooled[key], atol=1e-6, rtol=0), (key, (averaged[key] - pooled[key]).abs().max())


def test_fedbn_keeps_each_silos_batchnorm_and_takes_the_rest_from_the_global_model():
    silo = small_net(1)
    keys = batchnorm_keys(silo)
    assert keys == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    own = {k: v + 1 if v.is_floating_point() else v + 3 for k, v in silo.state_dict().items()}
    other = small_net(2).state_dict()
    global_state = weighted_average([own, other], [1, 1])
    assert weighted_average([own, other], [1, 1], exclude=keys).keys() == global_state.keys() - keys
    merged = keep_local(global_state, own, keys)
    for key in merged:
        expected = own[key] if key in keys else global_state[key]
        assert torch.equal(merged[key], expected), key
    first_round = keep_local(global_state, None, keys)
    assert all(torch.equal(first_round[k], global_state[k]) for k in global_state)


def test_mismatched_models_are_one_sentence():
    a, b = small_net(0).state_dict(), small_net(0, bn=False).state_dict()
    with pytest.raises(ValueError, match="other keys"):
        weighted_average([a, b], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([a, a], [0, 1])


def test_dirichlet_split_covers_every_example_once_and_small_alpha_is_skewed():
    labels = np.repeat(np.arange(5), 40)
    parts = dirichlet_split(labels, silos=3, alpha=0.5, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(200))
    assert min(len(p) for p in parts) >= 1
    assert dirichlet_split(labels, 3, 0.5, seed=0)[0].tolist() == parts[0].tolist()  # deterministic
    skew = [np.bincount(labels[p], minlength=5) / len(p) for p in dirichlet_split(labels, 3, 0.05, seed=1)]
    assert max(s.max() for s in skew) > 0.5  # at alpha 0.05 some silo is dominated by one class
    iid = iid_split(200, 3, seed=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(200)) and {len(p) for p in iid} <= {66, 67}


def test_the_coordinator_refuses_to_run_where_it_can_read_silo_data(tmp_path):
    from flows.core.errors import TunedeckError
    from flows.federated_rounds import check_unreadable

    assert check_unreadable([]) is None
    assert "cannot read any of the 1" in check_unreadable([str(tmp_path / "absent")])
    (tmp_path / "silo").mkdir()
    with pytest.raises(TunedeckError, match="can read silo data at .*silo"):
        check_unreadable([str(tmp_path / "absent"), str(tmp_path / "silo")])
