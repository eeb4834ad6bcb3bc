"""Which clients train in a round."""

from __future__ import annotations

import math

from fedssd.methods.protocol import OrdersSample
from fedssd.seeding import SAMPLE_ORDER, SAMPLING, numpy_rng


def clients_per_round(*, num_clients: int, fraction: float) -> int:
    """Number of clients sampled each round: ``fraction * K`` rounded, at least 1."""
    return max(1, min(num_clients, math.floor(fraction * num_clients + 0.5)))


def sample_clients(
    *, num_clients: int, fraction: float, round_index: int, seed: int, shuffle: bool = False
) -> list[int]:
    """The ids of the clients that train in round ``round_index``, in sample order.

    All clients when ``fraction`` is 1 (cross-silo); otherwise a uniform sample without
    replacement drawn from the run seed and the round alone (cross-device). The ids are sorted
    unless ``shuffle`` is set: then they come in a random order drawn from its own stream of the
    run seed and the round, so that a client's position in the sample changes from round to round
    (what SSD's ``dsr_keying = "position"`` needs); the set of ids is the same either way.
    """
    count = clients_per_round(num_clients=num_clients, fraction=fraction)
    if count == num_clients:
        chosen = list(range(num_clients))
    else:
        rng = numpy_rng(seed, SAMPLING, round_index)
        chosen = sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False))
    if not shuffle:
        return chosen
    order = numpy_rng(seed, SAMPLE_ORDER, round_index).permutation(len(chosen))
    return [chosen[int(i)] for i in order]


def shuffled_order(method: object) -> bool:
    """Whether ``method`` needs the round's sample in a random order (see
    :class:`~fedssd.methods.protocol.OrdersSample`; false for methods without the capability)."""
    return isinstance(method, OrdersSample) and method.random_sample_order
