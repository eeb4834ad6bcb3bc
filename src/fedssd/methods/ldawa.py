"""L-DAWA as an add-on to FedAlignUniform (Rehman et al., ICCV 2023, arXiv:2307.07393;
docs/methods.md, ``ldawa``).

Rehman, Gao, Li, Chen, Chen, "L-DAWA: Layer-wise Divergence Aware Weight Aggregation in Federated
Self-Supervised Visual Representation Learning", ICCV 2023, arXiv:2307.07393.

Clients optimise the FedAlignUniform objective unchanged; the server scales each client's layer by
the cosine between that layer and the same layer of the global model the round started from, and
averages: ``w_g^l <- (1/|S_t|) sum_k min(cos(w_k^l, w_g^l), 1) w_k^l``. A "layer" is one tensor of
the state dict (each weight, bias, BatchNorm parameter and running statistic separately), as in
the official aggregator. There is no renormalisation by the sum of the cosines (the aggregate
shrinks by the mean cosine, like a layer-wise weight decay) and no data-size weighting. The first
rounds use plain FedAvg (a warm-up; at initialisation some global tensors are exactly zero and
their cosine is undefined).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from fedssd.aggregate import fedavg
from fedssd.methods.fedalignuniform import FedAlignUniform
from fedssd.methods.protocol import ClientUpdate, MethodContext, require
from fedssd.methods.server import fedavg_updates
from fedssd.methods.views import AlignUniformOptions

State = Mapping[str, torch.Tensor]
_RUNNING_STATS = ("running_mean", "running_var")


@dataclasses.dataclass(frozen=True)
class LDAWAOptions(AlignUniformOptions):
    """Options of L-DAWA on FedAlignUniform (defaults: docs/methods.md, ``ldawa``).

    Attributes:
        uniformity_weight: Weight beta of the uniformity term of the base objective (inherited).
        uniformity_t: Temperature t of the uniformity term (inherited).
        mode: ``per_layer`` (one cosine per state-dict tensor: the paper's and the official
            aggregator's) or ``per_module`` (one cosine per top-level module over the
            concatenation of all its entries, counters included, as FedU2's port computes it;
            for reproducing numbers made with that code).
        warmup_rounds: Rounds (from round 0) aggregated with plain FedAvg before L-DAWA starts
            [I: the official script's intent, rounds 0-2].
        renormalize: Divide by the sum of the cosines instead of the number of clients (an
            ablation of the shrinkage) [I].
        bn_stats: ``scaled`` (BatchNorm running statistics are cosine-scaled like any tensor, as
            in the official code) or ``fedavg`` (averaged with FedAvg's weights) [I].
    """

    mode: Literal["per_layer", "per_module"] = "per_layer"
    warmup_rounds: int = 3
    renormalize: bool = False
    bn_stats: Literal["scaled", "fedavg"] = "scaled"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.warmup_rounds >= 0, "method.warmup_rounds must be >= 0")


def angular_weight(client: torch.Tensor, reference: torch.Tensor) -> float:
    """L-DAWA's weight of one client tensor: ``min(cos(client, reference), 1)``.

    No lower clip: a negative cosine flips the sign of the client's tensor (as in the official
    aggregator). A 0-dimensional entry (BatchNorm's counter) or a zero-norm tensor on either side
    gets weight 1 (its cosine is undefined). Computed in float64.

    Args:
        client: The client's tensor (any shape).
        reference: The global tensor of the same shape.
    """
    if client.ndim == 0:
        return 1.0
    a = client.detach().double().flatten()
    b = reference.detach().double().flatten()
    norms = float(a.norm()) * float(b.norm())
    if norms == 0.0:
        return 1.0
    return min(float(a @ b) / norms, 1.0)


def module_of(key: str) -> str:
    """The module a state-dict key belongs to for the per-module mode (``encoder``,
    ``projector``, ``extras.<name>``)."""
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "extras" and len(parts) > 2 else parts[0]


def layer_weights(reference: State, states: Sequence[State]) -> list[dict[str, float]]:
    """Per-client, per-tensor weights ``delta_k^l`` (see :func:`angular_weight`)."""
    return [{k: angular_weight(s[k], reference[k]) for k in reference} for s in states]


def module_weights(reference: State, states: Sequence[State]) -> list[dict[str, float]]:
    """Per-client weights with one cosine per module, broadcast to the module's tensors.

    The cosine is taken between the concatenations of all the module's entries (integer
    counters cast to float and included, as in FedU2's port), clipped at 1.
    """
    modules: dict[str, list[str]] = {}
    for key in reference:
        modules.setdefault(module_of(key), []).append(key)

    def flat(state: State, keys: list[str]) -> torch.Tensor:
        return torch.cat([state[k].detach().double().flatten() for k in keys])

    result = []
    for state in states:
        weights: dict[str, float] = {}
        for keys in modules.values():
            weight = angular_weight(flat(state, keys), flat(reference, keys))
            weights.update(dict.fromkeys(keys, weight))
        result.append(weights)
    return result


def ldawa_average(
    reference: State,
    states: Sequence[State],
    weights: Sequence[Mapping[str, float]],
    *,
    renormalize: bool = False,
) -> dict[str, torch.Tensor]:
    """``(1/|S|) sum_k delta_k^l w_k^l`` per entry (or divided by ``sum_k delta_k^l``).

    Integer entries (BatchNorm's ``num_batches_tracked``) are averaged unscaled and rounded.

    Args:
        reference: The global state the round started from (gives keys, shapes, dtypes).
        states: The clients' states.
        weights: Per client, the weight of each entry.
        renormalize: Divide by the sum of the weights instead of the number of clients (falls
            back to the number of clients where that sum is zero).

    Returns:
        The new global state; the inputs are not modified.
    """
    count = len(states)
    result: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        if not ref.is_floating_point():
            acc64 = sum(
                (s[key].double() for s in states), torch.zeros_like(ref, dtype=torch.float64)
            )
            result[key] = (acc64 / count).round().to(ref.dtype)
            continue
        deltas = [w[key] for w in weights]
        acc = torch.zeros_like(ref, dtype=torch.float32)
        for state, delta in zip(states, deltas, strict=True):
            acc.add_(state[key].float(), alpha=delta)
        total = sum(deltas)
        divisor = total if renormalize and abs(total) > 1e-12 else count
        result[key] = (acc / divisor).to(ref.dtype)
    return result


class LDAWA(FedAlignUniform):
    """FedAlignUniform locally (L-DAWA changes only the server); layer-wise divergence-aware
    aggregation on the server."""

    options: LDAWAOptions

    def __init__(self, options: LDAWAOptions, context: MethodContext) -> None:
        super().__init__(options, context)

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
    ) -> dict[str, torch.Tensor]:
        """FedAvg during the warm-up, then cosine-scaled averaging against ``global_state``."""
        opts = self.options
        if round_index < opts.warmup_rounds:
            return fedavg_updates(global_state, updates)
        states = [u.state for u in updates]
        averaged = fedavg(states, [u.weight for u in updates]) if opts.bn_stats == "fedavg" else {}
        reference = {k: global_state[k] for k in states[0]}
        finder = layer_weights if opts.mode == "per_layer" else module_weights
        result = ldawa_average(
            reference, states, finder(reference, states), renormalize=opts.renormalize
        )
        if opts.bn_stats == "fedavg":
            for key in result:
                if key.endswith(_RUNNING_STATS):
                    result[key] = averaged[key]
        # Entries no client sends (a method's local modules; none for L-DAWA) stay as they were.
        return {k: result.get(k, v) for k, v in global_state.items()}
