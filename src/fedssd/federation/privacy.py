"""Client-level differential privacy: DP-FedAvg with fixed or adaptive clipping.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018 (DP-FedAvg); Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021 (the quantile-tracking clip norm).

Each accepted client's update ``delta_k = state_k - global`` is clipped to L2 norm ``C`` over
every floating-point entry the client sends (weights and BatchNorm running statistics: both are
computed from its images, so both must be inside the bounded, noised vector). Integer entries
(BatchNorm's ``num_batches_tracked``, which counts the client's local batches, i.e. reveals its
data size) are not taken from the clients and keep the global model's value. The server averages
the clipped updates (FedAvg of ``global + clip(delta_k)``, so noise 0 and no clipping is FedAvg
itself) and adds Gaussian noise of standard deviation ``z * C * w_max`` to the weighted sum, i.e.
``z * C * w_max / sum(w)`` to the average. After the noise, BatchNorm running variances are
clamped at 0 (post-processing, which costs no privacy).

The privacy loss is counted by Google's ``dp-accounting`` (RDP accountant, Mironov 2017):

- ``federation.fraction = 1`` (cross-silo, every client every round): one Gaussian mechanism per
  round with noise multiplier ``z`` under add/remove-one-client adjacency (sensitivity ``C``).
- ``fraction < 1``: fedssd samples a fixed number ``m`` of the ``K`` clients without
  replacement, which is accounted exactly as such (``SampledWithoutReplacementDpEvent``, Wang,
  Balle, Kasiviswanathan 2019), under replace-one-client adjacency: replacing a client moves the
  clipped sum by up to ``2C``, so the accounted multiplier is ``z / 2``.

Pure functions (clip, noise, accounting, calibration) plus one small stateful object,
:class:`PrivateAggregator`, whose only state is the adaptive clip norm (restored from the round
records on resume).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedssd.config import Config, PrivacyConfig
from fedssd.errors import ConfigError, FedSSDError
from fedssd.federation.sampling import clients_per_round
from fedssd.methods.protocol import Aggregates, ClientUpdate, Method
from fedssd.methods.server import fedavg_updates
from fedssd.seeding import generator

# Purpose tag of the noise stream (seeding.py's tags are small integers; this one is "DP").
PRIVACY_NOISE = 0x4450
State = Mapping[str, torch.Tensor]


class PrivacyBudgetExhausted(FedSSDError):
    """The next round would spend more privacy than ``privacy.target_epsilon`` allows."""


@dataclasses.dataclass(frozen=True)
class Accounting:
    """How rounds are accounted.

    Attributes:
        num_clients: K.
        sampled: m, the clients sampled per round.
        noise_multiplier: z of the update sum (adaptive clipping: the total effective z).
        count_noise_multiplier: sigma_b of the clipped-count query (0 without adaptive clipping).
        delta: The delta at which epsilon is reported.
    """

    num_clients: int
    sampled: int
    noise_multiplier: float
    count_noise_multiplier: float
    delta: float


def update_noise_multiplier(noise_multiplier: float, count_noise_multiplier: float) -> float:
    """The update's own multiplier ``z_delta`` so that the update and the count together cost
    what one Gaussian of multiplier ``z`` costs (Andrew et al. 2021, section 3.1):
    ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``; ``z`` itself without a count query.

    Raises:
        ConfigError: ``2 sigma_b <= z`` (the count alone would spend the whole budget).
    """
    if count_noise_multiplier <= 0 or noise_multiplier == 0:
        return noise_multiplier
    rest = noise_multiplier**-2 - (2 * count_noise_multiplier) ** -2
    if rest <= 0:
        raise ConfigError(
            f"privacy.count_noise_multiplier ({count_noise_multiplier:g}) must be more than half "
            f"the noise multiplier ({noise_multiplier:g}), or the clipped-count query alone "
            "spends the whole privacy budget."
        )
    return float(rest**-0.5)


def _round_event(accounting: Accounting, noise_multiplier: float) -> Any:
    """The dp-accounting event of one round at total multiplier ``noise_multiplier``."""
    dp_accounting = _library()

    # The update and the (centred) count are two Gaussian queries of the same sample; their
    # relative sensitivities are 1 and 1/2 (Andrew et al.), hence the count's multiplier 2 sigma_b.
    z_update = update_noise_multiplier(noise_multiplier, accounting.count_noise_multiplier)
    queries: list[Any] = [dp_accounting.GaussianDpEvent(z_update)]
    if accounting.count_noise_multiplier > 0:
        queries.append(dp_accounting.GaussianDpEvent(2 * accounting.count_noise_multiplier))
    if accounting.sampled >= accounting.num_clients:
        return dp_accounting.ComposedDpEvent(queries)
    # Replace-one adjacency doubles the sensitivity: the accounted multipliers are halved.
    halved = [dp_accounting.GaussianDpEvent(q.noise_multiplier / 2) for q in queries]
    return dp_accounting.SampledWithoutReplacementDpEvent(
        accounting.num_clients, accounting.sampled, dp_accounting.ComposedDpEvent(halved)
    )


def _accountant(accounting: Accounting) -> Any:
    """An RDP accountant with the adjacency the sampling scheme needs."""
    relations = _library().privacy_accountant.NeighboringRelation
    relation = (
        relations.ADD_OR_REMOVE_ONE
        if accounting.sampled >= accounting.num_clients
        else relations.REPLACE_ONE
    )
    return _library().rdp.RdpAccountant(neighboring_relation=relation)


def epsilon_after(
    accounting: Accounting, rounds: int, noise_multiplier: float | None = None
) -> float:
    """Epsilon (at ``accounting.delta``) after ``rounds`` rounds; inf without noise, 0 for 0
    rounds.

    Args:
        accounting: The sampling scheme and noise.
        rounds: Rounds run so far.
        noise_multiplier: Overrides ``accounting.noise_multiplier`` (calibration).
    """
    z = accounting.noise_multiplier if noise_multiplier is None else noise_multiplier
    if rounds == 0:
        return 0.0
    if z <= 0:
        return math.inf
    accountant = _accountant(accounting)
    accountant.compose(_round_event(accounting, z), rounds)
    return float(accountant.get_epsilon(accounting.delta))


def calibrate_noise(accounting: Accounting, rounds: int, target_epsilon: float) -> float:
    """The smallest noise multiplier (to 0.1 %) whose epsilon after ``rounds`` rounds is at most
    ``target_epsilon``: dp-accounting's own bisection (``calibrate_dp_mechanism``).

    With adaptive clipping the update and the count together cost exactly one Gaussian of the
    total multiplier (their RDP adds up to that of ``z``), so the search runs on ``z`` alone and
    then checks that the count leaves the update some budget.

    Raises:
        ConfigError: No multiplier up to 10^4 reaches the target, or the one that does is not
            below twice the count's noise multiplier.
    """
    dp_accounting = _library()
    alone = dataclasses.replace(accounting, count_noise_multiplier=0.0)

    def make_event(z: float) -> Any:
        return dp_accounting.SelfComposedDpEvent(_round_event(alone, z), rounds)

    try:
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(alone),
            make_event,
            target_epsilon,
            accounting.delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-3,
        )
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as error:
        raise ConfigError(
            f"no noise multiplier meets privacy.target_epsilon = {target_epsilon:g} at delta "
            f"{accounting.delta:g} over {rounds} rounds ({error}); raise the target."
        ) from error
    sigma_b = accounting.count_noise_multiplier
    if sigma_b > 0 and z >= 2 * sigma_b:
        raise ConfigError(
            f"privacy.target_epsilon = {target_epsilon:g} needs a noise multiplier of {z:.3g}, "
            f"which adaptive clipping's count query (noise {sigma_b:g}) alone would spend; set "
            f"privacy.count_noise_multiplier above {z / 2:.3g}."
        )
    return float(z)


def _library() -> Any:
    """Google's dp-accounting (the ``privacy`` extra).

    Raises:
        ConfigError: It is not installed.
    """
    try:
        import dp_accounting
    except ImportError as error:
        raise ConfigError(
            "privacy.dp needs Google's dp-accounting for the privacy accountant; install it with "
            "pip install 'fedssd[privacy]'."
        ) from error
    return dp_accounting


def flat_norm(delta: State) -> float:
    """L2 norm of all the tensors of ``delta`` taken as one vector (computed in float64)."""
    if not delta:
        return 0.0
    squares = torch.stack([v.double().pow(2).sum() for v in delta.values()])
    return float(squares.sum().sqrt())


def clip_update(
    global_state: State, state: State, clip_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """The client's state with its floating-point change from ``global_state`` clipped to L2
    norm ``clip_norm`` (0 = no clipping); integer entries are replaced by the global ones.

    Returns:
        The clipped state (the client's own tensors where the change is within the norm, so no
        clipping is exactly the identity) and the change's norm before clipping.
    """
    floats = [k for k, v in state.items() if v.is_floating_point()]
    delta = {
        k: state[k].detach().to(torch.float32) - global_state[k].to(torch.float32) for k in floats
    }
    norm = flat_norm(delta)
    scale = 1.0 if clip_norm <= 0 or norm <= clip_norm else clip_norm / norm
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = global_state[key].clone()
        elif scale == 1.0:
            out[key] = value
        else:
            out[key] = (global_state[key].to(torch.float32) + delta[key] * scale).to(value.dtype)
    return out, norm


def gaussian_noise(
    template: State, std: float, *, seed: int, round_index: int
) -> dict[str, torch.Tensor]:
    """Independent N(0, std^2) noise for each floating-point entry of ``template``, drawn on the
    CPU in float32 from the run seed and the round (reproducible, and the same on any device)."""
    gen = generator(seed, PRIVACY_NOISE, round_index)
    out: dict[str, torch.Tensor] = {}
    for key, value in template.items():
        if value.is_floating_point():
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float32) * std
            out[key] = noise.to(value.device)
    return out


def check_private_method(method: Method) -> None:
    """Refuse a method whose server step is not a weighted average of the updates.

    Raises:
        ConfigError: The method has its own server aggregation.
    """
    if isinstance(method, Aggregates):
        raise ConfigError(
            f"differential privacy (privacy.dp) needs a server step that is a weighted average "
            f"of clipped updates, but {type(method).__name__} aggregates with its own rule that "
            "reads each update; use a FedAvg method (e.g. ssd, fedalignuniform) or privacy.dp = "
            "'off'."
        )


class PrivateAggregator:
    """DP-FedAvg for one run: clip, average, noise, track the adaptive clip norm, account.

    Args:
        config: The ``[privacy]`` table (``dp`` not ``off``).
        num_clients: K.
        sampled: m, the clients sampled per round.
        rounds: The planned rounds (for the noise calibration from a target epsilon).
        seed: The run seed (the noise stream).

    Raises:
        ConfigError: The settings cannot meet the target epsilon.
    """

    def __init__(
        self, config: PrivacyConfig, *, num_clients: int, sampled: int, rounds: int, seed: int
    ) -> None:
        self.config = config
        self.seed = seed
        sigma_b = 0.0
        if config.dp == "adaptive":
            sigma_b = (
                config.count_noise_multiplier
                if config.count_noise_multiplier is not None
                else sampled / 20  # Andrew et al.'s recommendation: m / 20
            )
        accounting = Accounting(num_clients, sampled, 0.0, sigma_b, config.delta)
        if config.noise_multiplier is None:
            assert config.target_epsilon > 0  # validated with the config
            z = calibrate_noise(accounting, rounds, config.target_epsilon)
        else:
            z = config.noise_multiplier
        self.accounting = dataclasses.replace(accounting, noise_multiplier=z)
        self.update_multiplier = update_noise_multiplier(z, sigma_b)
        self.clip_norm = config.clip_norm

    def restore(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Continue from the records of the rounds already run (resume): the last clip norm."""
        for record in reversed(history):
            if "dp_next_clip_norm" in record:
                self.clip_norm = float(record["dp_next_clip_norm"])
                return

    def check_budget(self, round_index: int) -> None:
        """Stop before round ``round_index`` (0-based) when it would exceed the target epsilon.

        Raises:
            PrivacyBudgetExhausted: It would.
        """
        target = self.config.target_epsilon
        if target <= 0:
            return
        epsilon = epsilon_after(self.accounting, round_index + 1)
        if epsilon > target:
            raise PrivacyBudgetExhausted(
                f"round {round_index + 1} would raise epsilon to {epsilon:.3g} (delta "
                f"{self.config.delta:g}), above privacy.target_epsilon = {target:g}; the run stops "
                "here with its checkpoints kept (raise the target or the noise multiplier to train "
                "longer)."
            )

    def aggregate(
        self,
        global_state: State,
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The next global state and the round's privacy record.

        Args:
            global_state: The global state the round started from.
            updates: The accepted updates (at least one).
            round_index: The 0-based round.

        Returns:
            The new global state and ``dp_*`` metrics: the clip norm used, the fraction of
            updates that were within it, the noise standard deviation on the average, the next
            round's clip norm and (epsilon, delta) after this round.
        """
        cfg = self.config
        clip = self.clip_norm
        weights = [1.0 if cfg.weighting == "uniform" else u.weight for u in updates]
        clipped: list[ClientUpdate] = []
        within = 0
        for update, weight in zip(updates, weights, strict=True):
            state, norm = clip_update(global_state, update.state, clip)
            within += int(clip <= 0 or norm <= clip)
            clipped.append(dataclasses.replace(update, state=state, weight=weight))
        new_state = fedavg_updates(global_state, clipped)
        # Noise on the weighted sum, std z * C * w_max; on the average, divided by sum(w).
        std = self.update_multiplier * clip * max(weights) / sum(weights)
        if std > 0:
            sent = updates[0].state
            noise = gaussian_noise(
                {k: new_state[k] for k in sent}, std, seed=self.seed, round_index=round_index
            )
            for key, value in noise.items():
                noisy = new_state[key].to(torch.float32) + value
                if key.endswith("running_var"):
                    noisy = noisy.clamp_min(0.0)  # post-processing: a variance is never negative
                new_state[key] = noisy.to(new_state[key].dtype)
        record: dict[str, Any] = {
            "dp_clip_norm": clip,
            "dp_unclipped_fraction": within / len(updates),
            "dp_noise_std": std,
        }
        if cfg.dp == "adaptive":
            self.clip_norm = self._next_clip(clip, within, len(updates), round_index)
        record["dp_next_clip_norm"] = self.clip_norm
        record["dp_noise_multiplier"] = self.accounting.noise_multiplier
        record["dp_epsilon"] = epsilon_after(self.accounting, round_index + 1)
        record["dp_delta"] = cfg.delta
        return new_state, record

    def idle(self, round_index: int) -> dict[str, Any]:
        """The privacy record of a skipped round (nothing released; counted as spent anyway, so
        that epsilon is an upper bound whatever the faults were)."""
        return {
            "dp_clip_norm": self.clip_norm,
            "dp_next_clip_norm": self.clip_norm,
            "dp_noise_multiplier": self.accounting.noise_multiplier,
            "dp_epsilon": epsilon_after(self.accounting, round_index + 1),
            "dp_delta": self.config.delta,
        }

    def _next_clip(self, clip: float, within: int, count: int, round_index: int) -> float:
        """Andrew et al.'s geometric update ``C <- C exp(-eta (b - gamma))`` from the noised
        fraction ``b`` of updates within the norm (bits centred at 1/2, noise sigma_b on their
        sum, divided by the number of sampled clients)."""
        sigma_b = self.accounting.count_noise_multiplier
        gen = generator(self.seed, PRIVACY_NOISE, round_index, 1)
        noise = float(torch.randn((), generator=gen, dtype=torch.float64)) * sigma_b
        centred = within - count / 2 + noise
        fraction = centred / self.accounting.sampled + 0.5
        return float(
            clip * math.exp(-self.config.clip_lr * (fraction - self.config.target_quantile))
        )


def make_aggregator(config: Config) -> PrivateAggregator | None:
    """The run's DP aggregator, or None when ``privacy.dp`` is off.

    Raises:
        ConfigError: No noise multiplier meets the target epsilon.
    """
    if config.privacy.dp == "off":
        return None
    fed = config.federation
    return PrivateAggregator(
        config.privacy,
        num_clients=fed.num_clients,
        sampled=clients_per_round(num_clients=fed.num_clients, fraction=fed.fraction),
        rounds=fed.rounds,
        seed=config.seed,
    )


def privacy_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last round's (epsilon, delta) and noise multiplier for ``summary.json`` (empty
    without DP)."""
    for record in reversed(history):
        if "dp_epsilon" in record:
            keys = ("dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_next_clip_norm")
            return {key: record[key] for key in keys}
    return {}
