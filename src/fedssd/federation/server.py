"""The server half of a round, shared by the in-process simulator and the Flower strategies.

The schedule (:class:`Schedule`, :func:`round_lr`), the opening of a round (:func:`open_round`:
the cohort, the learning rate, a copy of the global state, which entries stay on the clients
(:func:`local_keys`), the simulated faults), how a client's update is weighted
(:func:`client_weight`), the checks of each client's reply (:class:`RoundTally`: a crash, a
non-finite local loss, a simulated fault, no batches, :func:`~fedssd.federation.validate.
check_update`), the end of the round (:func:`conclude_round`: norm outliers over the learned
weights, divergence, the method's aggregate or the DP mechanism, the round's record) and the
round callbacks (:func:`run_callbacks`). The simulator and the Flower strategies differ only
in how the tasks reach the clients and the replies come back.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedssd.config import FaultConfig, PrivacyConfig, Sampling, ValidationConfig
from fedssd.errors import TrainingDiverged
from fedssd.federation.client import LocalResult
from fedssd.federation.faults import Fault, draw_fault
from fedssd.federation.privacy import PrivateAggregator, SecureSum, private_weight
from fedssd.federation.sampling import sample_clients, shuffled_order
from fedssd.federation.validate import check_update, learned_keys, norm_outliers, update_distance
from fedssd.methods.protocol import ClientHooks, ClientUpdate, Method
from fedssd.methods.server import aggregate_updates

# A callback sees the round's record and the new global model, and may return metrics to add.
Callback = Callable[[dict[str, Any], nn.Module], "dict[str, Any] | None"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The federation's schedule.

    Attributes:
        num_clients: Number of clients K.
        fraction: Fraction sampled per round.
        rounds: Number of rounds.
        lr: Base learning rate.
        lr_schedule: ``constant`` or ``cosine`` (over rounds).
        seed: The run seed.
        sampling: ``fixed`` or ``poisson`` (:mod:`fedssd.federation.sampling`).
    """

    num_clients: int
    fraction: float
    rounds: int
    lr: float
    lr_schedule: str
    seed: int
    sampling: Sampling = "fixed"


@dataclasses.dataclass(frozen=True)
class Guards:
    """Simulated faults, the server's update checks and differential privacy (None = off)."""

    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    privacy: PrivateAggregator | None = None


def round_lr(schedule: Schedule, round_index: int) -> float:
    """Learning rate of round ``round_index`` (0-based)."""
    if schedule.lr_schedule == "cosine":
        return schedule.lr * 0.5 * (1 + math.cos(math.pi * round_index / schedule.rounds))
    return schedule.lr


def local_keys(model: nn.Module, method: Method) -> frozenset[str]:
    """State-dict keys of the method's client-only modules (never sent or aggregated)."""
    names = method.local_modules if isinstance(method, ClientHooks) else frozenset()
    prefixes = tuple(f"extras.{name}." for name in names)
    return frozenset(k for k in model.state_dict() if prefixes and k.startswith(prefixes))


def run_callbacks(callbacks: Sequence[Callback], record: dict[str, Any], model: nn.Module) -> None:
    """Call each round callback in order with the round's record and the global model, adding
    the metrics it returns to ``record`` (shared with the Flower strategy)."""
    for callback in callbacks:
        extra = callback(record, model)
        if extra:
            record.update(extra)


def fault_reason(fault: Fault) -> str:
    """The round record's reason for a client whose simulated fault drops its trained update."""
    return "missed the deadline" if fault == "straggle" else "update lost"


def client_weight(num_batches: int, privacy: PrivacyConfig | None) -> float:
    """How much a client's update counts in the average: its local mini-batches (FedAvg's
    weight), or under DP :func:`~fedssd.federation.privacy.private_weight` (at most 1)."""
    if privacy is None:
        return float(num_batches)
    return private_weight(num_batches, privacy)


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """What the server fixed when it opened a round (:func:`open_round`).

    Attributes:
        index: The 0-based round.
        clients: The cohort's ids, in sample order.
        lr: The round's learning rate.
        global_state: A copy of the global state the round starts from.
        expected: The entries an update must hold (the global state without the local keys).
        measured: The entries the norm check measures (the model's
            :func:`~fedssd.federation.validate.learned_keys`).
        faults: Client id -> its simulated fault this round (None: none).
        privacy: The ``[privacy]`` table of a DP run (how updates are weighted), else None.
        started: ``time.perf_counter()`` when the round opened.
    """

    index: int
    clients: list[int]
    lr: float
    global_state: dict[str, torch.Tensor]
    expected: dict[str, torch.Tensor]
    measured: frozenset[str]
    faults: dict[int, Fault | None]
    privacy: PrivacyConfig | None
    started: float

    def tally(self, *, measure: bool = False) -> RoundTally:
        """An empty tally of the replies; ``measure`` records each client's movement from where
        it started (the norm check's measure) instead of leaving it to :func:`conclude_round`."""
        return RoundTally(
            self.expected,
            self.measured,
            privacy=self.privacy,
            movements={} if measure else None,
        )


def open_round(
    round_index: int,
    *,
    global_model: nn.Module,
    method: Method,
    schedule: Schedule,
    guards: Guards,
) -> RoundPlan:
    """Open round ``round_index``: check the privacy budget (before anyone trains), draw the
    cohort (from the run seed, or in a DP run from its secret generator), the learning rate, a
    copy of the global state, the entries that stay on the clients and the simulated faults.

    Raises:
        PrivacyBudgetExhausted: This round would exceed ``privacy.target_epsilon``.
    """
    started = time.perf_counter()
    privacy = guards.privacy
    if privacy is not None:
        privacy.check_budget(round_index)
    clients = sample_clients(
        num_clients=schedule.num_clients,
        fraction=schedule.fraction,
        round_index=round_index,
        seed=schedule.seed,
        shuffle=shuffled_order(method),
        sampling=schedule.sampling,
        rng=None if privacy is None else privacy.cohort_generator(round_index),
    )
    global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    keep_local = local_keys(global_model, method)
    return RoundPlan(
        index=round_index,
        clients=clients,
        lr=round_lr(schedule, round_index),
        global_state=global_state,
        expected={k: v for k, v in global_state.items() if k not in keep_local},
        measured=learned_keys(global_model),
        faults={
            client_id: draw_fault(
                guards.faults, seed=schedule.seed, round_index=round_index, client_id=client_id
            )
            for client_id in clients
        },
        privacy=None if privacy is None else privacy.config,
        started=started,
    )


@dataclasses.dataclass
class RoundTally:
    """The server's account of one round's replies, filled in sample order.

    Attributes:
        expected: The entries an update must hold (the global state without the local keys).
        measured: The entries the norm check measures (the model's
            :func:`~fedssd.federation.validate.learned_keys`).
        privacy: The ``[privacy]`` table of a DP run (how updates are weighted), else None.
        results: Every local result received (those that trained), in sample order.
        updates: The checked updates, in sample order.
        failed: Client id -> why the client sent no update (a crash, a lost update, a
            non-finite local loss, too few images to train a batch).
        rejected: Client id -> why the server refused the update it sent.
        movements: Client id -> distance its weights moved per local step, for the norm check;
            None lets :func:`conclude_round` measure each update from the global state.
        secure_sum: A distributed DP round's SecAgg+ sum (the server sees no update itself).
    """

    expected: Mapping[str, torch.Tensor]
    measured: frozenset[str]
    privacy: PrivacyConfig | None = None
    results: list[LocalResult] = dataclasses.field(default_factory=list)
    updates: list[ClientUpdate] = dataclasses.field(default_factory=list)
    failed: dict[int, str] = dataclasses.field(default_factory=dict)
    rejected: dict[int, str] = dataclasses.field(default_factory=dict)
    movements: dict[int, float] | None = None
    secure_sum: SecureSum | None = None

    def receive(
        self,
        client_id: int,
        fault: Fault | None,
        result: LocalResult,
        state: Callable[[], dict[str, torch.Tensor]],
        payload: Callable[[], dict[str, torch.Tensor]],
        *,
        origin: Mapping[str, torch.Tensor] | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Check one client's reply and keep its update if it passes.

        Args:
            client_id: The client.
            fault: Its simulated fault this round (a crash never gets here).
            result: Its local result.
            state: Gives the trained weights (read only once the cheaper checks pass).
            payload: Gives the method's payload (read only for an accepted update).
            origin: Where the client's weights started, to measure its movement over the
                ``measured`` entries (recorded in ``movements``); None records nothing.
            device: Where an accepted update's tensors go; None leaves them where they are.
        """
        self.results.append(result)
        if not result.finite:
            self.failed[client_id] = "local loss is NaN or infinite"
            return
        if fault is not None:
            self.failed[client_id] = fault_reason(fault)
            return
        if result.num_batches == 0:
            self.failed[client_id] = "too few images for one batch"
            return
        weights = state()
        reason = check_update(self.expected, weights)
        if reason is not None:
            self.rejected[client_id] = reason
            return
        extra = payload()
        if device is not None:
            weights = {k: v.to(device) for k, v in weights.items()}
            extra = {k: v.to(device) for k, v in extra.items()}
        weight = client_weight(result.num_batches, self.privacy)
        self.updates.append(ClientUpdate(client_id, weights, weight, extra, result.loss))
        if origin is not None and self.movements is not None:
            distance = update_distance(origin, weights, keys=self.measured)
            self.movements[client_id] = distance / result.num_batches


def conclude_round(
    plan: RoundPlan, tally: RoundTally, *, method: Method, guards: Guards
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The server half of a round once the clients' checked updates are in (shared with the
    Flower strategies): drop norm outliers, stop on divergence, skip a round with too few
    updates, aggregate with the method (or, in a DP run, the DP mechanism, which releases a
    noised mean every round, however many replied; in a distributed DP round, the clients'
    noised SecAgg+ sum), check the result.

    Args:
        plan: The round as it was opened.
        tally: The replies (``rejected`` gets the outliers added).
        method: Aggregates the accepted updates.
        guards: Fault, validation and privacy settings.

    Returns:
        The new global state (None when the round was skipped) and the round's record.

    Raises:
        TrainingDiverged: Every trained client's loss was non-finite, or the aggregate is.
    """
    round_index, global_state = plan.index, plan.global_state
    movements = tally.movements
    if movements is None and guards.validation.max_norm_ratio > 0:
        movements = {
            u.client_id: update_distance(global_state, u.state, keys=plan.measured) / u.weight
            for u in tally.updates
        }
    updates = _drop_outliers(tally.updates, movements or {}, guards.validation, tally.rejected)
    trained = [r for r in tally.results if r.num_batches > 0]
    if trained and not any(r.finite for r in trained):
        raise TrainingDiverged(
            f"training diverged in round {round_index + 1}: every client's local loss was NaN "
            "or infinite; lower federation.lr (the last good checkpoint, if any, is kept)."
        )
    privacy_record: dict[str, Any] = {}
    # Under DP the round is never skipped: whether it is would depend on who replied.
    skipped = guards.privacy is None and len(updates) < max(1, guards.faults.min_clients)
    new_state = None
    if guards.privacy is not None and tally.secure_sum is not None:
        new_state, privacy_record = guards.privacy.release_sum(global_state, tally.secure_sum)
    elif guards.privacy is not None:
        new_state, privacy_record = guards.privacy.aggregate(
            global_state, updates, keys=list(plan.expected), round_index=round_index
        )
    elif not skipped:
        new_state = aggregate_updates(method, global_state, updates, round_index=round_index)
    if new_state is not None and not _finite(new_state):
        raise TrainingDiverged(
            f"training diverged in round {round_index + 1}: the aggregated global model holds "
            "NaN or infinite values; lower federation.lr (the last good checkpoint, if any, "
            "is kept)."
        )
    record = _round_record(round_index, plan.clients, plan.lr, tally.results)
    record["accepted"] = len(updates)
    record["failed"] = {str(k): v for k, v in sorted(tally.failed.items())}
    record["rejected"] = {str(k): v for k, v in sorted(tally.rejected.items())}
    record["skipped"] = skipped
    record["seconds"] = time.perf_counter() - plan.started
    record.update(privacy_record)
    return new_state, record


def _finite(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating-point entry is finite (one device sync for the whole state)."""
    checks = [torch.isfinite(v).all() for v in state.values() if v.is_floating_point()]
    return not checks or bool(torch.stack(checks).all())


def _drop_outliers(
    updates: list[ClientUpdate],
    movements: Mapping[int, float],
    validation: ValidationConfig,
    rejected: dict[int, str],
) -> list[ClientUpdate]:
    """``updates`` without those whose movement per local step is an outlier (recorded in
    ``rejected``).

    Per step, because an honest client with many batches moves further in total (under a
    Dirichlet split, client sizes differ by hundreds of times).
    """
    if validation.max_norm_ratio <= 0 or len(updates) <= validation.min_peers:
        return updates
    steps = [movements[u.client_id] for u in updates]
    outliers = set(
        norm_outliers(steps, ratio=validation.max_norm_ratio, min_peers=validation.min_peers)
    )
    for i in sorted(outliers):
        others = statistics.median(d for j, d in enumerate(steps) if j != i)
        rejected[updates[i].client_id] = (
            f"update moved {steps[i]:.3g} per local step, more than "
            f"{validation.max_norm_ratio:g} times the median of the others ({others:.3g})"
        )
    return [u for i, u in enumerate(updates) if i not in outliers]


def _round_record(
    round_index: int, clients: list[int], lr: float, results: Sequence[LocalResult]
) -> dict[str, Any]:
    """Batch-weighted mean loss and parts over the round's clients with a finite loss."""
    finite = [r for r in results if r.finite]
    steps = sum(r.num_batches for r in finite)
    record: dict[str, Any] = {"round": round_index + 1, "clients": clients, "lr": lr}
    # What each client that reported trained on (its own images), by client id.
    record["samples"] = {str(r.client_id): r.num_samples for r in results}
    if steps == 0:
        record["loss"] = float("nan")
        return record
    record["loss"] = sum(r.loss * r.num_batches for r in finite) / steps
    names = sorted({name for r in finite for name in r.parts})
    for name in names:
        record[f"loss_{name}"] = sum(r.parts.get(name, 0.0) * r.num_batches for r in finite) / steps
    return record
