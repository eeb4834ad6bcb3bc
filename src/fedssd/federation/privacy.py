"""Client-level differential privacy: DP-FedAvg with fixed or adaptive clipping.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg); Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021 (the quantile-tracking clip norm).

The mechanism (:func:`private_mean`): each accepted client's update ``delta_k = state_k - global``
is clipped to L2 norm ``C`` over every floating-point entry the client sends (weights and
BatchNorm running statistics: both are computed from its images). Integer entries (BatchNorm's
``num_batches_tracked``, which reveals the client's data size) are not taken from the clients. The
server sums ``w_k * clip(delta_k)`` (``w_k <= 1``), adds Gaussian noise of standard deviation
``z * C`` to the sum and divides by a fixed, public number: the cohort size ``m`` (its expectation
``q K`` under Poisson sampling), never by the count of replies, so neither the noise nor the scale
depends on who answered. BatchNorm running variances are then clamped at 0 (post-processing).

The randomness an attacker must not know (the noise, the clip-count noise and the cohort) comes
from :class:`SecretRandomness`: numpy's Philox generator keyed from the operating system's entropy
source, held in memory only, never derived from the run seed and never written, logged or sent.
What the run spent is recorded round by round and accounted by :mod:`fedssd.federation.accounting`;
what of a round's record may be published is :func:`released`.

Distributed DP (``privacy.mode = "distributed"``, under SecAgg+ only): each client sends its
clipped update plus its own share of the noise (:func:`noised_share`, from a secret of its own:
:func:`share_generator`), calibrated so that the fewest shares SecAgg+ can unmask still carry the
planned noise; the server releases the unmasked sum over the public cohort size
(:meth:`PrivateAggregator.release_sum`), accounted with the shares it actually holds.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedssd.config import Config, PrivacyConfig, Sampling
from fedssd.errors import ConfigError, FedSSDError
from fedssd.federation.accounting import (
    RoundCharge,
    calibrate_noise,
    ledger,
    ledger_epsilon,
    round_charge,
    update_noise_multiplier,
)
from fedssd.methods.protocol import Aggregates, ClientUpdate, Method

# Purpose tag of the reproducible (test-only) streams: "DP".
PRIVACY_STREAM = 0x4450
# What each draw of a round is for (the reproducible streams are derived per round and purpose).
COHORT, NOISE, COUNT_NOISE, SHARE = 0, 1, 2, 3
# Distributed DP: SecAgg+'s quantisation range reaches this many standard deviations of a
# client's noise share beyond the clip norm (see range_failure_bound).
RANGE_SIGMAS = 10.0
# Bits of operating-system entropy behind the secret generator (Philox's key takes 128 of them).
SECRET_BITS = 256
State = Mapping[str, torch.Tensor]


class PrivacyBudgetExhausted(FedSSDError):
    """The next round would spend more privacy than ``privacy.target_epsilon`` allows."""


# ----------------------------------------------------------------------------- randomness


class SecretRandomness:
    """The random draws of a DP run that must stay secret: noise, clip-count noise, cohort.

    By default one ``numpy.random.Generator(Philox(SeedSequence(e)))`` with ``e`` 256 bits from
    :func:`secrets.randbits` (the operating system's entropy source), created when the run (or a
    resumed run) starts and held only in this object, which refuses to be pickled. With a seed
    (``privacy.reproducible_noise``, tests only) every round and purpose gets its own stream
    derived from the run seed instead: reproducible, and therefore not private.

    Args:
        seed: The run seed for the reproducible streams; None draws the secret.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._secret = (
            None
            if seed is not None
            else np.random.Generator(
                np.random.Philox(np.random.SeedSequence(secrets.randbits(SECRET_BITS)))
            )
        )

    @property
    def reproducible(self) -> bool:
        """Whether the draws come from the run seed (not private)."""
        return self._secret is None

    @property
    def seed(self) -> int | None:
        """The run seed of the reproducible streams (None: the draws are secret)."""
        return self._seed

    def generator(
        self, round_index: int, purpose: int, client: int | None = None
    ) -> np.random.Generator:
        """The generator for one purpose of one round (and client: a distributed noise share):
        the one secret stream, or the reproducible stream of (run seed, round, purpose, client)."""
        if self._secret is not None:
            return self._secret
        assert self._seed is not None
        key = [self._seed, PRIVACY_STREAM, round_index, purpose]
        if client is not None:
            key.append(client)
        return np.random.Generator(np.random.Philox(np.random.SeedSequence(key)))

    def __repr__(self) -> str:
        return f"SecretRandomness({'reproducible' if self.reproducible else 'secret'})"

    def __reduce__(self) -> Any:
        # A pickled generator would carry its key to wherever the bytes go.
        raise TypeError("the DP generator is secret and is never pickled")


def gaussian_noise(
    template: State, std: float, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """Independent N(0, std^2) noise for each floating-point entry of ``template`` (in its
    order), drawn in float32 by numpy's ziggurat sampler on the CPU and moved to the entry's
    device."""
    out: dict[str, torch.Tensor] = {}
    for key, value in template.items():
        if value.is_floating_point():
            draw = rng.standard_normal(tuple(value.shape), dtype=np.float32)
            out[key] = (torch.from_numpy(draw) * std).to(value.device)
    return out


# ----------------------------------------------------------------------------- the mechanism


def flat_norm(delta: State) -> float:
    """L2 norm of all the tensors of ``delta`` taken as one vector (computed in float64)."""
    if not delta:
        return 0.0
    squares = torch.stack([v.double().pow(2).sum() for v in delta.values()])
    return float(squares.sum().sqrt())


def clip_delta(
    global_state: State, state: State, clip_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """The floating-point change of ``state`` from ``global_state`` (float32), scaled down to L2
    norm ``clip_norm`` when it is longer (0 = no clipping), and its norm before clipping."""
    delta = {
        k: v.detach().to(torch.float32) - global_state[k].to(torch.float32)
        for k, v in state.items()
        if v.is_floating_point()
    }
    norm = flat_norm(delta)
    if clip_norm > 0 and norm > clip_norm:
        scale = clip_norm / norm
        delta = {k: v * scale for k, v in delta.items()}
    return delta, norm


def apply_mean(
    global_state: State, total: Mapping[str, torch.Tensor], denominator: float
) -> dict[str, torch.Tensor]:
    """``global + total / denominator`` for each entry of ``total``; every other entry (integer
    counters, client-only modules) keeps the global value. BatchNorm running variances are
    clamped at 0 (post-processing of a noised value: a variance is never negative)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in global_state.items():
        if key not in total:
            out[key] = value.clone()
            continue
        moved = value.to(torch.float32) + total[key] / denominator
        if key.endswith("running_var"):
            moved = moved.clamp_min(0.0)
        out[key] = moved.to(value.dtype)
    return out


def private_mean(
    global_state: State,
    updates: Sequence[ClientUpdate],
    *,
    keys: Collection[str],
    clip_norm: float,
    noise_std: float,
    denominator: float,
    rng: np.random.Generator | None,
) -> tuple[dict[str, torch.Tensor], int]:
    """The DP-FedAvg mechanism: clip, weighted sum, Gaussian noise, divide by a public number.

    Args:
        global_state: The global state the round started from.
        updates: The accepted updates (possibly none), each with a weight in [0, 1].
        keys: The entries the clients send (the floating-point ones are summed and noised).
        clip_norm: C (0: no clipping).
        noise_std: The noise's standard deviation on the sum (``z * C``).
        denominator: The public number the noised sum is divided by (the cohort size).
        rng: Where the noise comes from (None only without noise).

    Returns:
        The new global state and the number of updates that were within the clip norm.
    """
    total = {
        k: torch.zeros_like(global_state[k], dtype=torch.float32)
        for k in keys
        if global_state[k].is_floating_point()
    }
    within = 0
    for update in updates:
        if not 0 <= update.weight <= 1:
            raise ValueError(f"a DP weight must be in [0, 1], not {update.weight}")
        delta, norm = clip_delta(global_state, update.state, clip_norm)
        within += int(clip_norm <= 0 or norm <= clip_norm)
        for key in total:
            total[key] += delta[key] * update.weight
    if noise_std > 0:
        assert rng is not None
        for key, noise in gaussian_noise(total, noise_std, rng).items():
            total[key] += noise
    return apply_mean(global_state, total, denominator), within


# ----------------------------------------------------------------------------- distributed DP


@dataclasses.dataclass(frozen=True)
class SecureSum:
    """What the server of a distributed DP round learns: the SecAgg+ sum
    ``sum_k (w_k clip(delta_k) + share_k)`` over the clients in it.

    Attributes:
        total: The sum, for each floating-point entry the clients send.
        shares: How many clients' vectors (and so noise shares) the sum holds.
    """

    total: dict[str, torch.Tensor]
    shares: int


def min_noise_shares(cohort: int, min_replies: float) -> int:
    """The fewest noise shares the unmasked sum of a distributed DP round holds: SecAgg+'s
    reconstruction threshold for a cohort of ``cohort`` (``ceil(min_replies * cohort)``, at
    least 2, at most the cohort)."""
    return min(cohort, max(2, math.ceil(min_replies * cohort)))


def share_std(noise_multiplier: float, clip_norm: float, cohort: int) -> float:
    """A client's noise share's standard deviation, ``z C / sqrt(n)``: the ``n`` shares of a
    cohort add up to the full ``z C`` when every client replies."""
    return noise_multiplier * clip_norm / math.sqrt(cohort)


def quantisation_range(clip_norm: float, std: float) -> float:
    """SecAgg+'s range ``c`` for a client's noised entries: a weighted clipped entry lies in
    ``[-C, C]``, and the range reaches :data:`RANGE_SIGMAS` share deviations beyond it."""
    return clip_norm + RANGE_SIGMAS * std


def range_failure_bound(shares: int, entries: int, std: float) -> float:
    """An upper bound (union bound) on the probability that any of ``entries`` entries of any of
    ``shares`` clients leaves :func:`quantisation_range` in a round: each needs its noise to
    exceed :data:`RANGE_SIGMAS` deviations, probability ``erfc(RANGE_SIGMAS / sqrt 2)``
    (1.5e-23). Without noise nothing can leave it."""
    if std <= 0:
        return 0.0
    return min(1.0, shares * entries * math.erfc(RANGE_SIGMAS / math.sqrt(2)))


def noised_share(
    global_state: State,
    state: State | None,
    *,
    keys: Collection[str],
    clip_norm: float,
    weight: float,
    std: float,
    rng: np.random.Generator | None,
) -> dict[str, torch.Tensor]:
    """What a client sends into SecAgg+ under distributed DP, for each of ``keys``: its update
    clipped to ``clip_norm`` and weighted by ``weight`` (at most 1), plus its own noise share
    ``N(0, std^2)`` on each floating-point entry; zeros for the integer entries (the server
    keeps their global value). A client with nothing to send (``state`` None: diverged, no
    batches) still sends its noise share.

    Raises:
        ValueError: ``weight`` is not in [0, 1].
    """
    if not 0 <= weight <= 1:
        raise ValueError(f"a DP weight must be in [0, 1], not {weight}")
    floating = {k: global_state[k] for k in keys if global_state[k].is_floating_point()}
    if state is None:
        delta = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in floating.items()}
    else:
        delta, _ = clip_delta(floating, {k: state[k] for k in floating}, clip_norm)
    noise: dict[str, torch.Tensor] = {}
    if std > 0:
        assert rng is not None
        noise = gaussian_noise(delta, std, rng)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if key in delta:
            out[key] = delta[key] * weight + noise[key] if key in noise else delta[key] * weight
        else:
            out[key] = torch.zeros(global_state[key].shape, dtype=torch.float32)
    return out


def share_generator(seed: int | None, round_index: int, client_id: int) -> np.random.Generator:
    """Where a client draws its noise share: a fresh secret from the operating system's entropy
    source (``seed`` None), or with ``privacy.reproducible_noise`` (tests only) the stream of
    (run seed, round, client)."""
    return SecretRandomness(seed).generator(round_index, SHARE, client_id)


def check_private_method(method: Method) -> None:
    """Refuse a method whose server step is not a weighted average of the updates.

    Raises:
        ConfigError: The method has its own server aggregation.
    """
    if isinstance(method, Aggregates):
        raise ConfigError(
            f"differential privacy (privacy.dp) needs a server step that is a weighted average "
            f"of clipped updates, but {type(method).__name__} aggregates with its own rule that "
            "reads each update; use a FedAvg method (such as ssd or fedalignuniform) or "
            "privacy.dp = 'off'."
        )


def private_weight(num_batches: int, config: PrivacyConfig) -> float:
    """A client's weight under DP: 1 (``uniform``) or ``min(batches, cap) / cap`` (``batches``
    with the public ``weight_cap``), so that no weight exceeds 1."""
    if config.weighting == "uniform":
        return 1.0
    return min(float(num_batches), config.weight_cap) / config.weight_cap


class PrivateAggregator:
    """DP-FedAvg for one run: the cohort, the mechanism, the adaptive clip norm and the ledger.

    Args:
        config: The ``[privacy]`` table (``dp`` not ``off``).
        num_clients: K.
        fraction: The sampling fraction (``q``, or ``m / K``).
        sampling: ``fixed`` or ``poisson``.
        rounds: The run's total rounds (the noise calibration from a target epsilon).
        randomness: The secret (or, in tests, reproducible) generator.
        history: The records of the rounds already run (see :meth:`restore`).

    Raises:
        ConfigError: The settings cannot meet the target epsilon with the rounds left.
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
        history: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.config = config
        self.rounds = rounds
        self.randomness = randomness
        cohort = round_charge(
            num_clients=num_clients, fraction=fraction, sampling=sampling, noise_multiplier=0.0
        ).cohort
        sigma_b = 0.0
        if config.dp == "adaptive":
            sigma_b = (
                config.count_noise_multiplier
                if config.count_noise_multiplier is not None
                else cohort / 20  # Andrew et al.'s recommendation: m / 20
            )
        self.charge = round_charge(
            num_clients=num_clients,
            fraction=fraction,
            sampling=sampling,
            noise_multiplier=0.0,
            count_noise_multiplier=sigma_b,
        )
        self.clip_norm = config.clip_norm
        self.cohort = round(self.charge.cohort)
        # Distributed DP: the fewest noise shares a round's sum can hold; the charge planned
        # (calibrated, checked against the budget) is that of a round with only these.
        self.min_shares = (
            min_noise_shares(self.cohort, config.min_replies)
            if config.mode == "distributed"
            else self.cohort
        )
        self.spent: list[RoundCharge] = []
        self.restore(history)

    def restore(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Continue from the records of the rounds already run: their ledger, the last clip
        norm, and the noise multiplier of the rounds left.

        A run calibrated to ``target_epsilon`` keeps the multiplier it was planned with while
        its ledger holds only that one; otherwise (a run extended to more rounds) only the
        rounds left are calibrated, against the budget the ledger leaves.

        Raises:
            ConfigError: The ledger leaves no budget for the rounds left, or the records predate
                the ledger.
        """
        cfg = self.config
        if any("dp_epsilon" in r and RoundCharge.from_record(r) is None for r in history):
            raise ConfigError(
                "this DP run's records were written before the privacy ledger, so what its rounds "
                "spent cannot be accounted; it cannot be continued privately (start a new run)."
            )
        self.spent = ledger(history)
        for record in reversed(history):
            if "dp_next_clip_norm" in record:
                self.clip_norm = float(record["dp_next_clip_norm"])
                break
        if cfg.noise_multiplier is not None:
            self.charge = self.charge.with_noise(cfg.noise_multiplier)
            return
        left = self.rounds - len(history)
        planned = calibrate_noise([], self.charge, self.rounds, cfg.target_epsilon, cfg.delta)
        if all(charge == self.charge.with_noise(planned) for charge in self.spent) or left <= 0:
            self.charge = self.charge.with_noise(planned)
            return
        self.charge = self.charge.with_noise(
            calibrate_noise(self.spent, self.charge, left, cfg.target_epsilon, cfg.delta)
        )

    @property
    def distributed(self) -> bool:
        """Whether the clients add the noise (``privacy.mode = "distributed"``)."""
        return self.config.mode == "distributed"

    @property
    def noise_multiplier(self) -> float:
        """z of the noise on the sum when every sampled client replies. Distributed: the
        planned charge's multiplier scaled up so that the fewest shares a sum can hold still
        carry it (``z_min sqrt(n / r_min)``)."""
        return self.charge.noise_multiplier * math.sqrt(self.cohort / self.min_shares)

    def share_std(self) -> float:
        """Distributed DP: each client's noise share's standard deviation, ``z C / sqrt(n)``."""
        return share_std(self.noise_multiplier, self.clip_norm, self.cohort)

    def quantisation_range(self) -> float:
        """Distributed DP: SecAgg+'s quantisation range ``c`` (:func:`quantisation_range`)."""
        return quantisation_range(self.clip_norm, self.share_std())

    def epsilon(self) -> float:
        """Epsilon of the rounds run so far, from the ledger."""
        return ledger_epsilon(self.spent, self.config.delta)

    def check_budget(self, round_index: int) -> None:
        """Stop before round ``round_index`` (0-based) when it would exceed the target epsilon.

        Raises:
            PrivacyBudgetExhausted: It would.
        """
        target = self.config.target_epsilon
        if target <= 0:
            return
        epsilon = ledger_epsilon([*self.spent, self.charge], self.config.delta)
        if epsilon > target:
            raise PrivacyBudgetExhausted(
                f"round {round_index + 1} would raise epsilon to {epsilon:.3g} (delta "
                f"{self.config.delta:g}), above privacy.target_epsilon = {target:g}; the run stops "
                "here with its checkpoints kept (raise the target or the noise multiplier to train "
                "longer)."
            )

    def cohort_generator(self, round_index: int) -> np.random.Generator:
        """Where the round's cohort is drawn from (:func:`~fedssd.federation.sampling.
        sample_clients`): the secret generator."""
        return self.randomness.generator(round_index, COHORT)

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[ClientUpdate],
        *,
        keys: Collection[str],
        round_index: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The next global state and the round's privacy record.

        Args:
            global_state: The global state the round started from.
            updates: The accepted updates (possibly none: the noise is released anyway), each
                weighted by :func:`private_weight`.
            keys: The entries the clients send.
            round_index: The 0-based round.

        Returns:
            The new global state and the ``dp_*`` record: the clip norm used, the fraction of
            updates within it (server-only), the noise standard deviation on the mean, the next
            round's clip norm, the round's charge and (epsilon, delta) after it.
        """
        if self.distributed:
            raise RuntimeError("a distributed DP round is concluded from its SecAgg+ sum")
        clip, charge = self.clip_norm, self.charge
        z_update = update_noise_multiplier(charge.noise_multiplier, charge.count_noise_multiplier)
        new_state, within = private_mean(
            global_state,
            updates,
            keys=keys,
            clip_norm=clip,
            noise_std=z_update * clip,
            denominator=charge.cohort,
            rng=self.randomness.generator(round_index, NOISE),
        )
        record: dict[str, Any] = {
            "dp_clip_norm": clip,
            "dp_noise_std": z_update * clip / charge.cohort,
        }
        if updates:
            record["dp_unclipped_fraction"] = within / len(updates)
        if self.config.dp == "adaptive":
            self.clip_norm = self._next_clip(clip, within, len(updates), round_index)
        self.spent.append(charge)
        record["dp_next_clip_norm"] = self.clip_norm
        record.update(charge.to_record())
        record["dp_epsilon"] = self.epsilon()
        record["dp_delta"] = self.config.delta
        return new_state, record

    def release_sum(
        self, global_state: State, secure: SecureSum
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The next global state of a distributed DP round and its privacy record.

        The sum holds ``r = secure.shares`` noise shares of variance ``(z C)^2 / n`` each, so
        its noise has multiplier ``z_eff = z sqrt(r / n)``: the round is accounted with the
        noise actually present (a dropped client's share is missing). The sum is divided by
        the public cohort size ``n``, as in the central mechanism.

        Returns:
            The new global state and the ``dp_*`` record: the mode, the clip norm, the noise
            standard deviation on the mean, the shares in the sum and each share's deviation,
            SecAgg+'s range and the bound on the probability that an entry left it, the next
            clip norm, the round's charge and (epsilon, delta) after it.
        """
        std, clip = self.share_std(), self.clip_norm
        z_eff = self.noise_multiplier * math.sqrt(secure.shares / self.cohort)
        charge = self.charge.with_noise(z_eff)
        new_state = apply_mean(global_state, secure.total, charge.cohort)
        entries = sum(value.numel() for value in secure.total.values())
        self.spent.append(charge)
        record: dict[str, Any] = {
            "dp_mode": "distributed",
            "dp_clip_norm": clip,
            "dp_noise_std": z_eff * clip / charge.cohort,
            "dp_noise_shares": secure.shares,
            "dp_share_std": std,
            "dp_range": quantisation_range(clip, std),
            "dp_range_failure": range_failure_bound(self.cohort, entries, std),
            "dp_next_clip_norm": clip,
            **charge.to_record(),
            "dp_epsilon": self.epsilon(),
            "dp_delta": self.config.delta,
        }
        return new_state, record

    def _next_clip(self, clip: float, within: int, count: int, round_index: int) -> float:
        """Andrew et al.'s geometric update ``C <- C exp(-eta (b - gamma))`` from the noised
        fraction ``b`` of updates within the norm (bits centred at 1/2, noise sigma_b on their
        sum, divided by the public cohort size)."""
        sigma_b = self.charge.count_noise_multiplier
        rng = self.randomness.generator(round_index, COUNT_NOISE)
        noise = float(rng.standard_normal()) * sigma_b
        fraction = (within - count / 2 + noise) / self.charge.cohort + 0.5
        return float(
            clip * math.exp(-self.config.clip_lr * (fraction - self.config.target_quantile))
        )


def make_aggregator(
    config: Config, history: Sequence[Mapping[str, Any]] = ()
) -> PrivateAggregator | None:
    """The run's DP aggregator with a fresh secret (None when ``privacy.dp`` is off).

    Args:
        config: The resolved config.
        history: The records of the rounds already run (a resumed or extended run).

    Raises:
        ConfigError: No noise multiplier meets the target epsilon with the rounds left.
    """
    if config.privacy.dp == "off":
        return None
    fed = config.federation
    seed = config.seed if config.privacy.reproducible_noise else None
    return PrivateAggregator(
        config.privacy,
        num_clients=fed.num_clients,
        fraction=fed.fraction,
        sampling=fed.sampling,
        rounds=fed.rounds,
        randomness=SecretRandomness(seed),
        history=history,
    )


def check_noise_site(config: Config, *, secure_aggregation: bool) -> None:
    """Refuse distributed DP where no secure aggregation hides each client's noised update.

    Raises:
        ConfigError: ``privacy.mode = "distributed"`` without SecAgg+.
    """
    dp = config.privacy
    if dp.dp != "off" and dp.mode == "distributed" and not secure_aggregation:
        raise ConfigError(
            "privacy.mode = 'distributed' adds each client's share of the noise to its own "
            "update, which protects it only inside SecAgg+'s sum; run it on Flower with "
            "secure-aggregation = true, or use privacy.mode = 'central'."
        )


def privacy_warning(config: Config) -> str | None:
    """The line a run with reproducible noise must print (None otherwise)."""
    if config.privacy.dp == "off" or not config.privacy.reproducible_noise:
        return None
    return (
        "warning: privacy.reproducible_noise = true draws the DP noise and cohort from the run "
        "seed, so anyone with config.toml can regenerate and subtract them: this run is NOT "
        "private (use it for tests only)"
    )


# ----------------------------------------------------------------------------- what is released

# The entries of a round's record that a DP run releases (with the dp_* ones below); everything
# else (cohort ids, sample counts, losses, failures, timings, client scalars) is per-client or
# computed from the clients' raw replies, and goes to the server-only log.
RELEASED_KEYS = frozenset({"round", "lr", "knn_acc"})
SERVER_ONLY_DP_KEYS = frozenset({"dp_unclipped_fraction"})
# Summary entries counted from per-client outcomes or measured on each client's own images.
SERVER_ONLY_SUMMARY = frozenset(
    {
        "failed_clients",
        "rejected_clients",
        "sites",
        "skipped_rounds",
        "uniformity_intra",
        "uniformity_inter",
        "uniformity_intra_z",
        "uniformity_inter_z",
        "federated",
    }
)


def released(record: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a DP run's round record that may be published (``metrics.jsonl``, trackers)."""
    return {
        k: v
        for k, v in record.items()
        if k in RELEASED_KEYS or (k.startswith("dp_") and k not in SERVER_ONLY_DP_KEYS)
    }


def withheld(record: Mapping[str, Any]) -> dict[str, Any]:
    """The rest of a DP run's round record, for the server-only log (with its round)."""
    public = released(record)
    return {"round": record["round"], **{k: v for k, v in record.items() if k not in public}}


def release_view(config: Config) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """What of a round's record a run publishes: all of it without DP, :func:`released` with."""
    return dict if config.privacy.dp == "off" else released


def privacy_summary(history: Sequence[Mapping[str, Any]], config: PrivacyConfig) -> dict[str, Any]:
    """The run's (epsilon, delta) from its ledger, the last noise multiplier and clip norm, and
    whether the run is private at all, for ``summary.json`` (empty without DP)."""
    if config.dp == "off":
        return {}
    charges = ledger(history)
    last: Mapping[str, Any] = next((r for r in reversed(history) if "dp_next_clip_norm" in r), {})
    epsilon = ledger_epsilon(charges, config.delta)
    summary = {
        "dp_epsilon": epsilon,
        "dp_delta": config.delta,
        "dp_noise_multiplier": charges[-1].noise_multiplier if charges else None,
        "dp_next_clip_norm": last.get("dp_next_clip_norm", config.clip_norm),
        "dp_private": not config.reproducible_noise,
    }
    if config.mode == "distributed":
        summary["dp_mode"] = config.mode
        summary["dp_range_delta"] = range_delta(history, epsilon)
        summary["dp_server_epsilon"] = server_epsilon(history, config.delta)
    return summary


def server_epsilon(history: Sequence[Mapping[str, Any]], delta: float) -> float:
    """Epsilon of a distributed DP run against its server, which sees the SecAgg+ sums and knows
    each round's cohort, so no amplification by sampling holds against it: for each client,
    the rounds whose cohort held it compose as Gaussian mechanisms of their noise multipliers
    (add/remove adjacency, sensitivity ``C``); the largest over the clients. A Gaussian
    composition of multipliers ``z_r`` is the Gaussian of ``(sum_r z_r^-2)^(-1/2)``."""
    exposure: dict[int, float] = {}
    for record in history:
        charge = RoundCharge.from_record(record)
        if charge is None:
            continue
        if charge.noise_multiplier <= 0:
            return math.inf
        for client in record.get("clients", ()):
            exposure[client] = exposure.get(client, 0.0) + charge.noise_multiplier**-2
    if not exposure:
        return 0.0
    worst = max(exposure.values()) ** -0.5
    charge = round_charge(num_clients=1, fraction=1.0, sampling="fixed", noise_multiplier=worst)
    return ledger_epsilon([charge], delta)


def range_delta(history: Sequence[Mapping[str, Any]], epsilon: float) -> float:
    """What SecAgg+'s range adds to a distributed DP run's delta: the released outputs equal
    those of the unbounded Gaussian mechanism except when an entry left the range (at most
    ``beta``, the sum of the rounds' ``dp_range_failure``), so the run is
    ``(epsilon, delta + (1 + e^epsilon) beta)``-DP."""
    beta = sum(float(record.get("dp_range_failure", 0.0)) for record in history)
    if beta == 0:
        return 0.0
    return math.inf if epsilon > 700 else (1 + math.exp(epsilon)) * beta


def split_summary(
    summary: Mapping[str, Any], config: PrivacyConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's summary as (what ``summary.json`` holds, what a DP run keeps to the server-only
    log): without DP everything is in the first."""
    if config.dp == "off":
        return dict(summary), {}
    public = {k: v for k, v in summary.items() if k not in SERVER_ONLY_SUMMARY}
    return public, {k: v for k, v in summary.items() if k in SERVER_ONLY_SUMMARY}
