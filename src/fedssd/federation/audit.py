"""Auditing client-level DP with one training run: canary clients and a lower bound on epsilon.

Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023.

``m`` canary clients are drawn by the auditor, each with a fixed random direction ``u_i`` in the
space of the floating-point entries a client sends (the vector DP-FedAvg clips and noises), and
each taking part in the run with probability 1/2, independently. A canary that takes part sends
the update ``C u_i`` (``C``: the round's clip norm) in every round it is sampled. The auditor sees
every round's released global model, scores each canary by the inner product of its direction
with the sum of the observed changes of the global model, and guesses "in" for the ``k`` highest
scores and "out" for the ``k`` lowest, abstaining on the rest. If the mechanism is
``(epsilon, delta)``-DP with respect to adding or removing one client, the number of correct
guesses is unlikely to be large (:func:`p_value`); the largest epsilon that the observed count
rejects at confidence ``1 - beta`` is an empirical lower bound on the mechanism's epsilon
(:func:`epsilon_lower_bound`).

Pure functions (the statistics, the guesses, the scores, the canaries) plus
:class:`CanaryAggregator`, the run's DP aggregator with the canaries' updates added to each
round's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import special, stats

from fedssd.config import PrivacyConfig, Sampling
from fedssd.errors import ConfigError
from fedssd.federation.privacy import PrivateAggregator, SecretRandomness
from fedssd.methods.protocol import ClientUpdate
from fedssd.seeding import derive_seed, numpy_rng

# Purpose tag of the auditor's own random streams ("AUDT"); they are drawn from the audit's seed,
# never from the run seed, so the canaries are independent of the mechanism's randomness.
AUDIT = 0x41554454
State = Mapping[str, torch.Tensor]

GUESS_FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5)
"""The default numbers of guesses on each side, as fractions of the canaries; the bound is the
best of them, each tested at ``beta / len(fractions)`` (Bonferroni), so it stays a bound at
confidence ``1 - beta``."""


def p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """An upper bound on the probability of at least ``correct`` right guesses out of
    ``guesses`` when the mechanism is ``(epsilon, delta)``-DP (Steinke, Nasr, Jagielski 2023,
    their main theorem in its approximate-DP form):

    ``P[W >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i``, where
    ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``, ``m`` canaries, ``r`` guesses (the
    abstentions left out) and ``v`` right ones. With ``delta = 0`` it is the binomial tail alone
    (their pure-DP theorem).

    Args:
        canaries: m, the canaries (each in the run with probability 1/2).
        guesses: r, the guesses made (0 <= r <= m).
        correct: v, the right guesses (0 <= v <= r).
        epsilon: The epsilon of the hypothesis.
        delta: The delta of the hypothesis.
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct ({correct}) <= guesses ({guesses}) <= canaries")
    if correct == 0:
        return 1.0
    q = float(special.expit(epsilon))  # the accuracy of epsilon-DP randomised response
    tail = float(stats.binom.sf(correct - 1, guesses, q))
    if delta == 0:
        return min(1.0, tail)
    # f(v - i) - f(v) = P[v - i <= B <= v - 1]: sums of the pmf from v - 1 downwards (exact,
    # where differences of tails near 1 would cancel).
    below = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    gaps = np.cumsum(below) / np.arange(1, correct + 1)
    return min(1.0, tail + 2 * canaries * delta * float(gaps.max()))


def epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, beta: float
) -> float:
    """The largest epsilon whose ``(epsilon, delta)`` hypothesis the guesses reject at level
    ``beta`` (:func:`p_value` at most ``beta``), to 1e-7; 0 when even epsilon = 0 is not
    rejected.

    If the mechanism is ``(epsilon, delta)``-DP, the value exceeds epsilon with probability at
    most ``beta`` (over the canaries' coins and the mechanism).
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), not {beta}")

    def rejected(epsilon: float) -> bool:
        value = p_value(
            canaries=canaries, guesses=guesses, correct=correct, epsilon=epsilon, delta=delta
        )
        return value <= beta

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):  # ends: at a large epsilon, q = 1 and the tail is 1
        low, high = high, 2 * high
    # Bisection keeping rejected(low) and not rejected(high): the value returned is rejected.
    while high - low > 1e-7:
        middle = (low + high) / 2
        if rejected(middle):
            low = middle
        else:
            high = middle
    return low


def guess(scores: np.ndarray, per_side: int) -> np.ndarray:
    """Guesses from the canaries' scores: +1 ("in") for the ``per_side`` highest, -1 ("out")
    for the ``per_side`` lowest, 0 (abstain) for the rest; ties go by index (stable sort).

    Args:
        scores: ``(m,)`` scores, higher meaning more likely in.
        per_side: k, at most ``m // 2``.
    """
    m = len(scores)
    if not 0 <= per_side <= m // 2:
        raise ValueError(f"per_side must be in [0, {m // 2}], not {per_side}")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(m, dtype=np.int64)
    guesses[order[:per_side]] = -1
    guesses[order[m - per_side :]] = 1
    return guesses


@dataclasses.dataclass(frozen=True)
class Bound:
    """The audit's empirical lower bound on epsilon.

    Attributes:
        epsilon: The lower bound (0: nothing shown).
        guesses: r, the guesses of the best candidate (``2 k``).
        correct: v, its right guesses.
        canaries: m.
        delta: The delta it holds at.
        confidence: ``1 - beta``.
    """

    epsilon: float
    guesses: int
    correct: int
    canaries: int
    delta: float
    confidence: float


def audit_bound(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    confidence: float = 0.95,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> Bound:
    """The empirical epsilon lower bound from the canaries' scores and coins.

    For each fraction ``f``, guess with ``k = max(1, round(f m))`` per side (at most ``m // 2``)
    and bound at level ``beta / len(fractions)``; the best bound holds at confidence
    ``1 - beta`` (union bound over the candidates, chosen before the scores are seen).

    Args:
        scores: ``(m,)`` canary scores.
        included: ``(m,)`` bool, which canaries took part.
        delta: The delta of the bound (the run's).
        confidence: ``1 - beta``.
        fractions: The candidate numbers of guesses per side, as fractions of ``m``.
    """
    m = len(scores)
    if m < 2 or len(included) != m:
        raise ValueError("need at least 2 canaries and one coin per score")
    beta = (1 - confidence) / len(fractions)
    truth = np.where(included, 1, -1)
    best = Bound(0.0, 0, 0, m, delta, confidence)
    for fraction in fractions:
        per_side = min(m // 2, max(1, round(fraction * m)))
        guesses = guess(scores, per_side)
        made = int(np.count_nonzero(guesses))
        correct = int(np.count_nonzero(guesses == truth))
        epsilon = epsilon_lower_bound(
            canaries=m, guesses=made, correct=correct, delta=delta, beta=beta
        )
        if epsilon > best.epsilon or best.guesses == 0:
            best = Bound(epsilon, made, correct, m, delta, confidence)
    return best


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which entries of a state dict form the audited vector (the floating-point entries a
    client sends, in state-dict order), and their shapes."""

    keys: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def dimension(self) -> int:
        """d, the length of the flattened vector."""
        return sum(math.prod(shape) for shape in self.shapes)

    def flatten(self, state: State) -> torch.Tensor:
        """The audited entries of ``state`` as one float64 vector ``(d,)`` on the CPU."""
        return torch.cat([state[k].detach().double().cpu().flatten() for k in self.keys])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(d,)`` back to one tensor per audited entry."""
        sizes = [math.prod(shape) for shape in self.shapes]
        parts = torch.split(vector, sizes)
        return {k: p.reshape(s) for k, p, s in zip(self.keys, parts, self.shapes, strict=True)}


def audited_layout(state: State, excluded: frozenset[str] = frozenset()) -> Layout:
    """The layout of the floating-point entries of ``state`` outside ``excluded`` (the
    method's client-only keys, which never leave a client)."""
    keys = tuple(k for k, v in state.items() if v.is_floating_point() and k not in excluded)
    return Layout(keys, tuple(state[k].shape for k in keys))


@dataclasses.dataclass(frozen=True)
class Canaries:
    """The auditor's canary clients.

    Attributes:
        directions: ``(m, d)`` float32 orthonormal rows, one unit direction per canary.
        included: ``(m,)`` bool, whose coin said "in".
    """

    directions: torch.Tensor
    included: np.ndarray


def draw_canaries(count: int, dimension: int, *, seed: int) -> Canaries:
    """``count`` canaries in a ``dimension``-dimensional update space, from the audit's seed.

    The directions are a uniformly random orthonormal set (QR of a Gaussian matrix with the
    signs fixed), so that no canary adds anything to another's score (hence at most
    ``dimension`` of them).

    Raises:
        ConfigError: Fewer than 2 canaries, or more than the dimension.
    """
    if not 2 <= count <= dimension:
        raise ConfigError(
            f"the audit needs between 2 and {dimension} canaries (the number of floating-point "
            f"entries a client sends), not {count}."
        )
    included = numpy_rng(seed, AUDIT, 0).random(count) < 0.5
    gen = torch.Generator().manual_seed(derive_seed(seed, AUDIT, 1))
    gaussian = torch.randn(dimension, count, generator=gen)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed (Mezzadri 2007)
    return Canaries(q.T.contiguous(), included)


def canary_scores(canaries: Canaries, layout: Layout, released: Sequence[State]) -> np.ndarray:
    """Each canary's score: the inner product of its direction with the sum, over rounds, of the
    observed change of the global model (the auditor sees every released global model).

    Args:
        canaries: The canaries.
        layout: The audited entries.
        released: The global state before the first round, then after each round.

    Returns:
        ``(m,)`` float64 scores.
    """
    directions = canaries.directions.double()
    total = torch.zeros(len(directions), dtype=torch.float64)
    previous = layout.flatten(released[0])
    for state in released[1:]:
        current = layout.flatten(state)
        total += directions @ (current - previous)
        previous = current
    return total.numpy()


def canary_update(
    global_state: State, layout: Layout, direction: torch.Tensor, *, norm: float, client_id: int
) -> ClientUpdate:
    """A canary's reply: the global state plus ``norm`` times its direction on the audited
    entries (the other entries as the global state has them), weight 1."""
    step = layout.unflatten(direction.double() * norm)
    state = {
        k: (v.double() + step[k].to(v.device)).to(v.dtype) if k in step else v
        for k, v in global_state.items()
    }
    return ClientUpdate(client_id, state, 1.0)


class CanaryAggregator(PrivateAggregator):
    """The run's DP-FedAvg aggregator with the canaries' updates added to each round's accepted
    updates, before clipping: to the mechanism they are clients like any other.

    A canary whose coin said "in" takes part in every round when every client does, and in each
    round with probability ``fraction`` under Poisson sampling, drawn from the audit's seed (the
    same distribution as the real clients' secret cohort, independent of it). A cohort of fixed
    size below K is not auditable this way (see :func:`fedssd.experiments.audit.
    check_auditable`).

    Args:
        config: The ``[privacy]`` table.
        num_clients: K, the real clients.
        fraction: The sampling fraction.
        sampling: ``fixed`` (with fraction 1: every client every round) or ``poisson``.
        rounds: The planned rounds.
        randomness: The run's secret (or reproducible) generator.
        canaries: The canaries.
        layout: The audited entries (also those a canary's direction lives in).
        audit_seed: The audit's seed (the canaries' participation under Poisson sampling).
    """

    def __init__(
        self,
        config: PrivacyConfig,
        *,
        num_clients: int,
        fraction: float,
        sampling: Sampling,
        rounds: int,
        randomness: SecretRandomness,
        canaries: Canaries,
        layout: Layout,
        audit_seed: int,
    ) -> None:
        super().__init__(
            config,
            num_clients=num_clients,
            fraction=fraction,
            sampling=sampling,
            rounds=rounds,
            randomness=randomness,
        )
        self.canaries = canaries
        self.layout = layout
        self.audit_seed = audit_seed
        self.num_clients = num_clients

    def taking_part(self, round_index: int) -> np.ndarray:
        """The ids of the canaries that send their update in round ``round_index``."""
        chosen = self.canaries.included
        if self.charge.sampling == "poisson":
            draws = numpy_rng(self.audit_seed, AUDIT, 2, round_index).random(len(chosen))
            chosen = chosen & (draws < self.charge.rate)
        return np.flatnonzero(chosen)

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[ClientUpdate],
        *,
        keys: Collection[str],
        round_index: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """:meth:`PrivateAggregator.aggregate` of the updates and the canaries' of this round."""
        sent = {k: global_state[k] for k in keys}
        extra = [
            canary_update(
                sent,
                self.layout,
                self.canaries.directions[i],
                norm=self.clip_norm,
                client_id=self.num_clients + int(i),
            )
            for i in self.taking_part(round_index)
        ]
        return super().aggregate(
            global_state, [*updates, *extra], keys=keys, round_index=round_index
        )
