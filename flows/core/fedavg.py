"""Federated averaging (FedAvg, McMahan et al. 2017) of silos' state dicts, FedBN, and non-IID splits.

Pure torch and numpy: no Prefect, no files. The coordinator flow averages what the silos send;
the unit tests and the bench call the same functions.

Integer buffers (BatchNorm's ``num_batches_tracked``) are averaged like the floats, by example
count, then rounded to the nearest integer. The counter only matters with ``momentum=None``,
where it is the denominator of BatchNorm's cumulative average: the averaged running statistics
are an example-weighted mean of the silos' own, so the weighted mean of their counters keeps
the next update on the scale every silo was at. It is exact for identical silos and always lies
between the smallest and largest counter (a sum would overstate it by the number of silos).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import torch
from torch import nn

State = Mapping[str, torch.Tensor]


def weighted_average(states: Sequence[State], counts: Sequence[int], exclude: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The example-weighted mean of the state dicts, key by key, leaving out the keys in ``exclude``.

    Floats are summed in float64 and cast back to their dtype; integer tensors are averaged the
    same way and rounded (see the module docstring). Every state must have the same keys, shapes
    and dtypes; a count must be positive.
    """
    if not states or len(states) != len(counts):
        raise ValueError(f"need one example count per state dict (got {len(states)} states, {len(counts)} counts)")
    if any(int(c) <= 0 for c in counts):
        raise ValueError(f"example counts must be positive (got {list(counts)})")
    _check_same_layout(states)
    total = float(sum(int(c) for c in counts))
    weights = [int(c) / total for c in counts]
    averaged = {}
    for key, first in states[0].items():
        if key in exclude:
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].detach().to("cpu", torch.float64) * weight
        if not (first.is_floating_point() or first.is_complex()):
            acc = acc.round()
        averaged[key] = acc.to(first.dtype)
    return averaged


def _check_same_layout(states: Sequence[State]) -> None:
    """Raise ValueError naming the first key whose presence, shape or dtype differs between silos."""
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        if state.keys() != first.keys():
            odd = sorted(set(state) ^ set(first))[:3]
            raise ValueError(f"state dict {i} has other keys than state dict 0 (e.g. {', '.join(odd)}): were they the same model?")
        for key, tensor in state.items():
            if tensor.shape != first[key].shape or tensor.dtype != first[key].dtype:
                raise ValueError(
                    f"'{key}' is {tuple(tensor.shape)} {tensor.dtype} in state dict {i} but "
                    f"{tuple(first[key].shape)} {first[key].dtype} in state dict 0: were they the same model?"
                )


def batchnorm_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of every BatchNorm layer: weight, bias, running mean/var, num_batches_tracked."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict().keys())
    return frozenset(keys)


def keep_local(global_state: State, local_state: State | None, local_keys: Collection[str]) -> dict[str, torch.Tensor]:
    """FedBN on a silo: the global weights, except the keys in ``local_keys`` taken from this silo's own last state.

    In its first round a silo has no state of its own yet (``None``): it starts from the global one.
    """
    merged = {k: v.clone() for k, v in global_state.items()}
    if local_state is not None:
        for key in local_keys:
            merged[key] = local_state[key].clone()
    return merged


def dirichlet_split(labels: np.ndarray, silos: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Indices of each silo for a non-IID split: every class spread over the silos by Dirichlet(alpha) proportions.

    Small alpha (0.1) gives each silo few classes; large alpha (100) tends to IID. Draws again
    (up to 100 times) until every silo has at least ``min_size`` examples.
    """
    labels = np.asarray(labels)
    if silos < 1 or alpha <= 0:
        raise ValueError(f"need silos >= 1 and alpha > 0 (got {silos}, {alpha})")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(silos)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet([alpha] * silos)) * len(idx)).astype(int)[:-1]
            for silo, chunk in enumerate(np.split(idx, cuts)):
                parts[silo].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"{len(labels)} examples cannot give each of {silos} silos {min_size} at alpha {alpha}: use fewer silos")


def iid_split(n: int, silos: int, seed: int) -> list[np.ndarray]:
    """Indices of each silo for an IID split: a random permutation cut into near-equal parts."""
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, silos)]
