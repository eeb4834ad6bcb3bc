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
"""

from __future__ import annotations

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
COHORT, NOISE, COUNT_NOISE = 0, 1, 2
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

    def generator(self, round_index: int, purpose: int) -> np.random.Generator:
        """The generator for one purpose of one round: the one secret stream, or the
        reproducible stream of (run seed, round, purpose)."""
        if self._secret is not None:
            return self._secret
        assert self._seed is not None
        key = [self._seed, PRIVACY_STREAM, round_index, purpose]
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
    return {
        "dp_epsilon": ledger_epsilon(charges, config.delta),
        "dp_delta": config.delta,
        "dp_noise_multiplier": charges[-1].noise_multiplier if charges else None,
        "dp_next_clip_norm": last.get("dp_next_clip_norm", config.clip_norm),
        "dp_private": not config.reproducible_noise,
    }


def split_summary(
    summary: Mapping[str, Any], config: PrivacyConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run's summary as (what ``summary.json`` holds, what a DP run keeps to the server-only
    log): without DP everything is in the first."""
    if config.dp == "off":
        return dict(summary), {}
    public = {k: v for k, v in summary.items() if k not in SERVER_ONLY_SUMMARY}
    return public, {k: v for k, v in summary.items() if k in SERVER_ONLY_SUMMARY}
