"""Server-side averaging of client models (pure functions on state dicts).

The weighted sum runs on whole lists of tensors with ``torch._foreach_add_`` (one call per client
and dtype group instead of one per client and entry), which matters when a round has hundreds of
clients with small models. :class:`FedAvgAccumulator` does the same work one client at a time, so a
round loop can fold each client in as it finishes instead of keeping every client's state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class FedAvgAccumulator:
    """A running weighted sum of state dicts; :meth:`result` divides by the total weight.

    Floating-point entries are summed in float32 (or in their own dtype when it is float64) and
    integer entries (BatchNorm's ``num_batches_tracked``) in float64, then rounded back, exactly
    like :func:`fedavg`. Entries are grouped by dtype so that each :meth:`add` is one
    ``torch._foreach_add_`` per group.

    Args:
        template: A state dict giving the keys, shapes, dtypes and device.
    """

    def __init__(self, template: Mapping[str, torch.Tensor]) -> None:
        self._keys = list(template)
        # Group key -> keys whose accumulators share one accumulation dtype and source dtype.
        self._groups: dict[tuple[torch.dtype, torch.dtype], list[str]] = {}
        for key, value in template.items():
            self._groups.setdefault((value.dtype, _accumulation_dtype(value.dtype)), []).append(key)
        self._sums = {
            group: [torch.zeros_like(template[k], dtype=group[1]) for k in keys]
            for group, keys in self._groups.items()
        }
        self._weights: list[float] = []

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Add ``weight * state`` (the state is read, not kept).

        Raises:
            ValueError: The weight is negative or the state's keys differ from the template's.
        """
        if weight < 0:
            raise ValueError("fedavg weights must be non-negative")
        if len(state) != len(self._keys) or any(k not in state for k in self._keys):
            raise ValueError("fedavg needs every state to have the same keys")
        for (source, accumulate), keys in self._groups.items():
            tensors = [state[k].detach() for k in keys]
            if source != accumulate:
                tensors = [t.to(accumulate) for t in tensors]
            torch._foreach_add_(self._sums[(source, accumulate)], tensors, alpha=float(weight))
        self._weights.append(float(weight))

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted average of the states added so far, in the template's dtypes.

        Raises:
            ValueError: No state was added or the total weight is not positive.
        """
        if not self._weights:
            raise ValueError("fedavg needs one weight per state and at least one state")
        total = sum(self._weights)
        if total <= 0:
            raise ValueError("fedavg needs a positive total weight")
        out: dict[str, torch.Tensor] = {}
        for (source, _accumulate), keys in self._groups.items():
            averaged = torch._foreach_div(self._sums[(source, _accumulate)], total)
            for key, value in zip(keys, averaged, strict=True):
                if not source.is_floating_point:
                    value = value.round()
                out[key] = value.to(source)
        return {key: out[key] for key in self._keys}


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for floats (float64 kept), float64 for integers so that rounding back is exact."""
    if dtype.is_floating_point:
        return torch.float64 if dtype == torch.float64 else torch.float32
    return torch.float64


def fedavg(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of client state dicts (FedAvg, McMahan et al. 2017).

    Every entry is averaged, BatchNorm running statistics included (as in the SSD paper's released
    code). Integer entries (BatchNorm's ``num_batches_tracked``) are averaged and rounded back to
    integers.

    Args:
        states: One state dict per client, all with the same keys and shapes.
        weights: One non-negative weight per client (the paper: its number of local mini-batches).

    Returns:
        A new state dict; the inputs are not modified.
    """
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    if float(sum(weights)) <= 0:
        raise ValueError("fedavg needs a positive total weight")
    accumulator = FedAvgAccumulator(states[0])
    for state, weight in zip(states, weights, strict=True):
        accumulator.add(state, weight)
    return accumulator.result()
