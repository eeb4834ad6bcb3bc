"""The privacy ledger of a DP run and its accountant.

Every round's record holds what the round spent (:class:`RoundCharge`: how the cohort was drawn,
its rate and size, the noise multipliers), so a run's checkpoints and ``metrics.jsonl`` carry the
whole ledger, and epsilon is always computed from it (:func:`ledger_epsilon`) by Google's
``dp-accounting`` (RDP accountant, Mironov 2017):

- every client every round (``fraction = 1``): one Gaussian mechanism of multiplier ``z`` per
  round, under add/remove-one-client adjacency (sensitivity ``C``);
- ``federation.sampling = "poisson"`` (each client independently with probability ``q``): the
  Poisson-sampled Gaussian (``PoissonSampledDpEvent``) under add/remove adjacency, the convention
  of the DP-FedAvg papers;
- ``federation.sampling = "fixed"`` (``m`` of ``K`` without replacement):
  ``SampledWithoutReplacementDpEvent`` (Wang, Balle, Kasiviswanathan, AISTATS 2019) under
  replace-one adjacency, where replacing a client moves the clipped sum by up to ``2C``: the
  accounted multipliers are halved.

Adaptive clipping's count query (Andrew et al. 2021) is a second Gaussian of the same cohort,
composed with the update's (:func:`update_noise_multiplier`). Calibration
(:func:`calibrate_noise`) finds the smallest multiplier for the rounds still to run against the
budget the ledger leaves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from fedssd.config import Sampling
from fedssd.errors import ConfigError
from fedssd.federation.sampling import clients_per_round

Scheme = Literal["all", "fixed", "poisson"]


@dataclasses.dataclass(frozen=True)
class RoundCharge:
    """What one round spent: one entry of a run's privacy ledger.

    Attributes:
        sampling: ``all`` (every client), ``fixed`` (m of K without replacement) or ``poisson``.
        num_clients: K.
        cohort: m, or the expected cohort ``q K`` under Poisson sampling (the public
            denominator of the mean).
        rate: The sampling rate: ``m / K``, or ``q``.
        noise_multiplier: z of the round (adaptive clipping: the total of update and count).
        count_noise_multiplier: sigma_b of the clipped-count query (0 without adaptive clipping).
    """

    sampling: Scheme
    num_clients: int
    cohort: float
    rate: float
    noise_multiplier: float
    count_noise_multiplier: float = 0.0

    def with_noise(self, noise_multiplier: float) -> RoundCharge:
        """The same round at another noise multiplier."""
        return dataclasses.replace(self, noise_multiplier=noise_multiplier)

    def to_record(self) -> dict[str, Any]:
        """The ``dp_*`` entries of a round's record."""
        return {
            "dp_sampling": self.sampling,
            "dp_num_clients": self.num_clients,
            "dp_cohort": self.cohort,
            "dp_sampling_rate": self.rate,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_count_noise_multiplier": self.count_noise_multiplier,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RoundCharge | None:
        """The charge a round's record holds (None for a record without one)."""
        if "dp_sampling" not in record:
            return None
        return cls(
            sampling=record["dp_sampling"],
            num_clients=int(record["dp_num_clients"]),
            cohort=float(record["dp_cohort"]),
            rate=float(record["dp_sampling_rate"]),
            noise_multiplier=float(record["dp_noise_multiplier"]),
            count_noise_multiplier=float(record["dp_count_noise_multiplier"]),
        )


def round_charge(
    *,
    num_clients: int,
    fraction: float,
    sampling: Sampling,
    noise_multiplier: float,
    count_noise_multiplier: float = 0.0,
) -> RoundCharge:
    """The charge of a round of a federation of ``num_clients`` sampled at ``fraction``."""
    if sampling == "poisson" and fraction < 1:
        return RoundCharge(
            "poisson",
            num_clients,
            fraction * num_clients,
            fraction,
            noise_multiplier,
            count_noise_multiplier,
        )
    m = clients_per_round(num_clients=num_clients, fraction=fraction)
    scheme: Scheme = "all" if m == num_clients else "fixed"
    return RoundCharge(
        scheme, num_clients, float(m), m / num_clients, noise_multiplier, count_noise_multiplier
    )


def ledger(history: Sequence[Mapping[str, Any]]) -> list[RoundCharge]:
    """The charges of the rounds in ``history``, in order (records without one are skipped)."""
    charges = (RoundCharge.from_record(record) for record in history)
    return [charge for charge in charges if charge is not None]


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


def _event(charge: RoundCharge) -> Any:
    """The dp-accounting event of one round."""
    dp_accounting = _library()
    # The update and the (centred) count are two Gaussian queries of the same cohort; their
    # relative sensitivities are 1 and 1/2 (Andrew et al.), hence the count's multiplier 2 sigma_b.
    z_update = update_noise_multiplier(charge.noise_multiplier, charge.count_noise_multiplier)
    multipliers = [z_update]
    if charge.count_noise_multiplier > 0:
        multipliers.append(2 * charge.count_noise_multiplier)
    if charge.sampling == "fixed":
        # Replace-one adjacency doubles the sensitivity: the accounted multipliers are halved.
        halved = [dp_accounting.GaussianDpEvent(z / 2) for z in multipliers]
        return dp_accounting.SampledWithoutReplacementDpEvent(
            charge.num_clients, round(charge.cohort), dp_accounting.ComposedDpEvent(halved)
        )
    queries = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z) for z in multipliers])
    if charge.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(charge.rate, queries)
    return queries


def _relation(charges: Sequence[RoundCharge]) -> Any:
    """The neighbouring relation the charges are accounted under (one for the whole ledger).

    Raises:
        ConfigError: The charges mix fixed-size sampling (replace-one) with the others
            (add/remove), whose epsilons do not compose.
    """
    relations = _library().privacy_accountant.NeighboringRelation
    fixed = {charge.sampling == "fixed" for charge in charges}
    if len(fixed) > 1:
        raise ConfigError(
            "the privacy ledger mixes fixed-size sampling (replace-one adjacency) with "
            "every-client or Poisson rounds (add/remove adjacency), whose epsilons do not "
            "compose; keep one federation.sampling for the whole run."
        )
    return relations.REPLACE_ONE if fixed == {True} else relations.ADD_OR_REMOVE_ONE


def _composed(charges: Sequence[RoundCharge]) -> Any:
    """One dp-accounting event for a sequence of rounds (equal neighbours composed together)."""
    dp_accounting = _library()
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(_event(charge), len(list(run)))
            for charge, run in itertools.groupby(charges)
        ]
    )


def ledger_epsilon(charges: Sequence[RoundCharge], delta: float) -> float:
    """Epsilon (at ``delta``) of the rounds ``charges``: 0 without rounds, inf when a round had
    no noise.

    Raises:
        ConfigError: The charges mix neighbouring relations (see :func:`_relation`).
    """
    return _ledger_epsilon(tuple(charges), delta)


# The accountant takes about a second per Poisson-sampled ledger and the calibration's bisection
# several, and a run asks the same questions again (the budget check before a round, the epsilon
# after it, the summary; the setup check, then each aggregator it builds). Both functions are
# pure over hashable arguments, so their answers are kept.
@functools.lru_cache(maxsize=256)
def _ledger_epsilon(charges: tuple[RoundCharge, ...], delta: float) -> float:
    """:func:`ledger_epsilon` of a tuple of charges."""
    if not charges:
        return 0.0
    if any(charge.noise_multiplier <= 0 for charge in charges):
        return math.inf
    accountant = _library().rdp.RdpAccountant(neighboring_relation=_relation(charges))
    with _quiet_orders():
        accountant.compose(_composed(charges))
        return float(accountant.get_epsilon(delta))


def calibrate_noise(
    spent: Sequence[RoundCharge],
    charge: RoundCharge,
    rounds: int,
    target_epsilon: float,
    delta: float,
) -> float:
    """The smallest noise multiplier (to 0.1 %) for ``rounds`` more rounds of ``charge`` such that
    they and the rounds already ``spent`` stay within ``target_epsilon``: dp-accounting's own
    bisection (``calibrate_dp_mechanism``) over the whole ledger.

    With adaptive clipping the update and the count together cost exactly one Gaussian of the
    total multiplier (their RDP adds up to that of ``z``), so the search runs on ``z`` alone and
    then checks that the count leaves the update some budget.

    Raises:
        ConfigError: The rounds spent leave no budget, no multiplier up to 10^4 reaches the
            target, or the one that does is not below twice the count's noise multiplier.
    """
    return _calibrate_noise(tuple(spent), charge, rounds, target_epsilon, delta)


@functools.lru_cache(maxsize=64)
def _calibrate_noise(
    spent: tuple[RoundCharge, ...],
    charge: RoundCharge,
    rounds: int,
    target_epsilon: float,
    delta: float,
) -> float:
    """:func:`calibrate_noise` of a tuple of charges spent."""
    dp_accounting = _library()
    used = ledger_epsilon(spent, delta)
    if used >= target_epsilon:
        raise ConfigError(
            f"the {len(spent)} rounds already run have spent epsilon {used:.4g} of "
            f"privacy.target_epsilon = {target_epsilon:g} (delta {delta:g}), so no noise "
            f"multiplier keeps {rounds} more rounds within it; the run cannot be continued."
        )
    alone = dataclasses.replace(charge, count_noise_multiplier=0.0)
    relation = _relation([*spent, alone])

    def make_event(z: float) -> Any:
        return _composed([*spent, *[alone.with_noise(z)] * rounds])

    try:
        with _quiet_orders():
            z = dp_accounting.calibrate_dp_mechanism(
                lambda: dp_accounting.rdp.RdpAccountant(neighboring_relation=relation),
                make_event,
                target_epsilon,
                delta,
                bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
                tol=1e-3,
            )
    except (ValueError, dp_accounting.mechanism_calibration.NoBracketIntervalFoundError) as error:
        raise ConfigError(
            f"no noise multiplier meets privacy.target_epsilon = {target_epsilon:g} at delta "
            f"{delta:g} over {rounds} rounds ({error}); raise the target."
        ) from error
    sigma_b = charge.count_noise_multiplier
    if sigma_b > 0 and z >= 2 * sigma_b:
        raise ConfigError(
            f"privacy.target_epsilon = {target_epsilon:g} needs a noise multiplier of {z:.3g}, "
            f"which adaptive clipping's count query (noise {sigma_b:g}) alone would spend; set "
            f"privacy.count_noise_multiplier above {z / 2:.3g}."
        )
    return float(z)


class _OrderWarnings(logging.Filter):
    """Drops dp-accounting's warning that an RDP order did not converge and is left out (the
    accountant then minimises over the other orders, so epsilon stays an upper bound)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


@contextlib.contextmanager
def _quiet_orders() -> Iterator[None]:
    """Silence :class:`_OrderWarnings` while the accountant runs (they would flood the log)."""
    logger, quiet = logging.getLogger("absl"), _OrderWarnings()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


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
