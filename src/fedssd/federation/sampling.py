"""Which clients train in a round."""

from __future__ import annotations

import math

from fedssd.seeding import SAMPLING, numpy_rng


def clients_per_round(*, num_clients: int, fraction: float) -> int:
    """Number of clients sampled each round: ``fraction * K`` rounded, at least 1."""
    return max(1, min(num_clients, math.floor(fraction * num_clients + 0.5)))


def sample_clients(*, num_clients: int, fraction: float, round_index: int, seed: int) -> list[int]:
    """The sorted ids of the clients that train in round ``round_index``.

    All clients when ``fraction`` is 1 (cross-silo); otherwise a uniform sample without
    replacement drawn from the run seed and the round alone (cross-device).
    """
    count = clients_per_round(num_clients=num_clients, fraction=fraction)
    if count == num_clients:
        return list(range(num_clients))
    rng = numpy_rng(seed, SAMPLING, round_index)
    return sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False))
