"""Server-side checks of client updates, shared by the simulator and the Flower strategy.

A client may send garbage: non-finite numbers after a diverged local run, a model of another
shape, or (poisoned or broken) weights far from everyone else's. Each check gives a reason the
round's record can carry; a rejected update is left out of the aggregation and the round goes on.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn


def check_update(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> str | None:
    """Why ``state`` cannot be aggregated with models shaped like ``expected``, or None.

    Args:
        expected: The entries a client must send (name -> tensor of the right shape and dtype).
        state: What the client sent.
    """
    missing = sorted(set(expected) - set(state))
    if missing:
        return f"missing entry {missing[0]!r}"
    extra = sorted(set(state) - set(expected))
    if extra:
        return f"unexpected entry {extra[0]!r}"
    for key, reference in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"entry {key!r} is not a tensor"
        if value.shape != reference.shape:
            return (
                f"entry {key!r} has shape {tuple(value.shape)}, expected {tuple(reference.shape)}"
            )
        if value.dtype != reference.dtype:
            return f"entry {key!r} has dtype {value.dtype}, expected {reference.dtype}"
    floats = [key for key, value in state.items() if value.is_floating_point()]
    # One device-to-host sync for the whole state; the offending entry is looked up only on failure.
    if floats and not bool(torch.stack([torch.isfinite(state[k]).all() for k in floats]).all()):
        bad = next(k for k in floats if not bool(torch.isfinite(state[k]).all()))
        return f"entry {bad!r} holds NaN or infinite values"
    return None


def learned_keys(model: nn.Module) -> frozenset[str]:
    """The state-dict keys of ``model``'s parameters: what local training learns.

    The rest of a state dict are buffers: BatchNorm's running mean and variance and its batch
    counter, which follow the statistics of the images a client saw rather than what it learned
    (on a site whose images differ from the others' they make up most of the distance), and
    values the server sets (Orchestra's centroids). Shared parameters appear under each of their
    names, as in the state dict.
    """
    return frozenset(name for name, _ in model.named_parameters(remove_duplicate=False))


def update_distance(
    reference: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    keys: Collection[str],
) -> float:
    """The L2 distance between two states over their floating-point entries named in ``keys``
    (:func:`learned_keys` for the norm check)."""
    squares = [
        (value.detach().double() - reference[key].detach().double().to(value.device)).square().sum()
        for key, value in state.items()
        if key in keys and value.is_floating_point()
    ]
    # Summed on the device, read once (one sync instead of one per entry).
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
    return float(total.sqrt())


def norm_outliers(distances: Sequence[float], *, ratio: float, min_peers: int) -> list[int]:
    """Positions whose distance exceeds ``ratio`` times the median of the *other* distances.

    Comparing each update with the median of the others means a single huge update cannot
    raise the bar that judges it. Nothing is rejected with fewer than ``min_peers`` others or
    when ``ratio`` is 0. With 3 or more others (the default ``validation.min_peers``) the median
    is a middle value that one extreme value among them cannot move; the median of two is their
    mean, which one slow honest site pulls down far enough to make a fast honest one an outlier.
    """
    if ratio <= 0 or len(distances) - 1 < min_peers:
        return []
    flagged = []
    for i, distance in enumerate(distances):
        median = statistics.median(d for j, d in enumerate(distances) if j != i)
        if median > 0 and distance > ratio * median:
            flagged.append(i)
    return flagged
