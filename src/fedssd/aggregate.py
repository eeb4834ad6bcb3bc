"""Server-side averaging of client models (pure functions on state dicts)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def fedavg(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of client state dicts (FedAvg, McMahan et al. 2017).

    Every entry is averaged, BatchNorm running statistics included (SSD.md section 1). Integer
    entries (BatchNorm's ``num_batches_tracked``) are averaged and rounded back to integers.

    Args:
        states: One state dict per client, all with the same keys and shapes.
        weights: One non-negative weight per client (the paper: its number of local mini-batches).

    Returns:
        A new state dict; the inputs are not modified.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg needs a positive total weight")
    coefficients = [float(w) / total for w in weights]
    result: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float32)
            for state, c in zip(states, coefficients, strict=True):
                acc.add_(state[key].float(), alpha=c)
            result[key] = acc.to(first.dtype)
        else:
            acc64 = torch.zeros_like(first, dtype=torch.float64)
            for state, c in zip(states, coefficients, strict=True):
                acc64.add_(state[key].double(), alpha=c)
            result[key] = acc64.round().to(first.dtype)
    return result
