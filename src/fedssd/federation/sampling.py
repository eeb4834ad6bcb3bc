"""Which clients train in a round.

Two schemes (``federation.sampling``): ``fixed`` draws ``round(fraction * K)`` clients without
replacement (all of them when that is ``K``); ``poisson`` takes each client independently with
probability ``fraction``, so a round's cohort varies in size and may be empty (the scheme the
DP-FedAvg accounting assumes). The generator is the run seed's (reproducible), except in a
differentially private run, whose cohort is drawn from its secret generator
(:mod:`fedssd.federation.privacy`).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from fedssd.methods.protocol import OrdersSample
from fedssd.seeding import SAMPLE_ORDER, SAMPLING, numpy_rng

SamplingScheme = Literal["fixed", "poisson"]


def clients_per_round(*, num_clients: int, fraction: float) -> int:
    """Number of clients sampled each round under fixed-size sampling: ``fraction * K``
    rounded, at least 1 (under Poisson sampling, the expected number is ``fraction * K``)."""
    return max(1, min(num_clients, math.floor(fraction * num_clients + 0.5)))


def draw_cohort(
    rng: np.random.Generator, *, num_clients: int, fraction: float, sampling: SamplingScheme
) -> list[int]:
    """The sorted ids of one round's cohort, drawn with ``rng`` (see the module docstring).

    Every client, without a draw, when the scheme takes all of them (fraction 1).
    """
    if sampling == "poisson":
        if fraction >= 1:
            return list(range(num_clients))
        return [int(k) for k in np.flatnonzero(rng.random(num_clients) < fraction)]
    count = clients_per_round(num_clients=num_clients, fraction=fraction)
    if count == num_clients:
        return list(range(num_clients))
    return sorted(int(k) for k in rng.choice(num_clients, size=count, replace=False))


def sample_clients(
    *,
    num_clients: int,
    fraction: float,
    round_index: int,
    seed: int,
    shuffle: bool = False,
    sampling: SamplingScheme = "fixed",
    rng: np.random.Generator | None = None,
) -> list[int]:
    """The ids of the clients that train in round ``round_index``, in sample order.

    The cohort comes from :func:`draw_cohort` with ``rng``, by default the run seed's stream of
    this round (cross-device; cross-silo, fraction 1, takes every client). The ids are sorted
    unless ``shuffle`` is set: then they come in a random order drawn from its own stream of the
    run seed and the round, so that a client's position in the sample changes from round to round
    (what SSD's ``dsr_keying = "position"`` needs); the set of ids is the same either way.
    """
    if rng is None:
        rng = numpy_rng(seed, SAMPLING, round_index)
    chosen = draw_cohort(rng, num_clients=num_clients, fraction=fraction, sampling=sampling)
    if not shuffle:
        return chosen
    order = numpy_rng(seed, SAMPLE_ORDER, round_index).permutation(len(chosen))
    return [chosen[int(i)] for i in order]


def shuffled_order(method: object) -> bool:
    """Whether ``method`` needs the round's sample in a random order (see
    :class:`~fedssd.methods.protocol.OrdersSample`; false for methods without the capability)."""
    return isinstance(method, OrdersSample) and method.random_sample_order
