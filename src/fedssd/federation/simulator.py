"""The in-process federated simulator: the round loop.

sample clients -> for each: load the global weights into one reused client model, the method's
client hooks, train locally, check the update -> the method's aggregate (FedAvg by default,
:func:`~fedssd.methods.server.aggregate_updates`) -> callbacks (evaluate,
log, checkpoint, progress). The loop never learns a method's name.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fedssd.config import FaultConfig, ValidationConfig
from fedssd.errors import TrainingDiverged
from fedssd.federation.client import LocalResult, LocalSettings, local_train
from fedssd.federation.faults import draw_fault
from fedssd.federation.privacy import PrivateAggregator
from fedssd.federation.sampling import sample_clients, shuffled_order
from fedssd.federation.store import ClientStore, stamp_participation
from fedssd.federation.validate import check_update, norm_outliers, update_distance
from fedssd.methods.protocol import ClientHooks, ClientUpdate, Method
from fedssd.methods.server import aggregate_updates
from fedssd.seeding import CLIENT, generator

# A callback sees the round's record and the new global model, and may return metrics to add.
Callback = Callable[[dict[str, Any], nn.Module], "dict[str, Any] | None"]
# Told after each client's local training: (round index, position, clients this round, result).
ClientCallback = Callable[[int, int, int, LocalResult], None]


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
    """

    num_clients: int
    fraction: float
    rounds: int
    lr: float
    lr_schedule: str
    seed: int


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


def run_rounds(
    *,
    global_model: nn.Module,
    client_model: nn.Module,
    method: Method,
    images: torch.Tensor,
    client_indices: Sequence[torch.Tensor],
    schedule: Schedule,
    settings: LocalSettings,
    store: ClientStore | None = None,
    guards: Guards | None = None,
    start_round: int = 0,
    history: list[dict[str, Any]] | None = None,
    callbacks: Sequence[Callback] = (),
    on_client: ClientCallback | None = None,
) -> list[dict[str, Any]]:
    """Run rounds ``start_round .. schedule.rounds - 1`` and return the records of all rounds.

    Args:
        global_model: Holds the global weights; updated in place after each round.
        client_model: A second model of the same shape, reused for every client.
        method: The federated method.
        images: ``(n, channels, height, width)`` uint8 dataset on the training device.
        client_indices: One int64 index tensor per client, on the same device.
        schedule: Rounds, sampling and learning-rate schedule.
        settings: Local training settings (its ``lr`` is replaced by each round's).
        store: Per-client state kept between rounds (a new one when None).
        guards: Simulated faults and update validation (none simulated, default checks when None).
        start_round: The first round to run (a resumed run starts after its checkpoint).
        history: The records of the rounds before ``start_round``; new records are appended.
        callbacks: Called after each round with the record and the global model, in order.
        on_client: Called after each client's local training (progress within long rounds).

    Returns:
        ``history`` with one record per round: ``round`` (1-based), ``clients``, ``lr``,
        ``loss``, ``loss_<part>``, ``accepted``, ``failed`` (client id -> reason),
        ``skipped``, ``client_state`` (client id -> the scalars a stateful method keeps, e.g.
        FedEMA's lambda and mu), ``seconds`` and whatever the callbacks added.

    Raises:
        TrainingDiverged: Every client that trained in a round had a non-finite loss, or the
            aggregated model holds NaN or infinite values.
        PrivacyBudgetExhausted: The next round would exceed ``privacy.target_epsilon``.
    """
    store = ClientStore() if store is None else store
    guards = Guards() if guards is None else guards
    history = [] if history is None else history
    if guards.privacy is not None:
        guards.privacy.restore(history)
    for round_index in range(start_round, schedule.rounds):
        if guards.privacy is not None:
            guards.privacy.check_budget(round_index)  # before the clients spend time training
        record = run_round(
            round_index,
            global_model=global_model,
            client_model=client_model,
            method=method,
            images=images,
            client_indices=client_indices,
            schedule=schedule,
            settings=settings,
            store=store,
            guards=guards,
            on_client=on_client,
        )
        history.append(record)
        run_callbacks(callbacks, record, global_model)
    return history


def run_callbacks(callbacks: Sequence[Callback], record: dict[str, Any], model: nn.Module) -> None:
    """Call each round callback in order with the round's record and the global model, adding
    the metrics it returns to ``record`` (shared with the Flower strategy)."""
    for callback in callbacks:
        extra = callback(record, model)
        if extra:
            record.update(extra)


def run_round(
    round_index: int,
    *,
    global_model: nn.Module,
    client_model: nn.Module,
    method: Method,
    images: torch.Tensor,
    client_indices: Sequence[torch.Tensor],
    schedule: Schedule,
    settings: LocalSettings,
    store: ClientStore,
    guards: Guards,
    on_client: ClientCallback | None,
) -> dict[str, Any]:
    """One round (see :func:`run_rounds`); returns its record."""
    start = time.perf_counter()
    clients = sample_clients(
        num_clients=schedule.num_clients,
        fraction=schedule.fraction,
        round_index=round_index,
        seed=schedule.seed,
        shuffle=shuffled_order(method),
    )
    lr = round_lr(schedule, round_index)
    round_settings = dataclasses.replace(settings, lr=lr)
    hooks = method if isinstance(method, ClientHooks) else None
    global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
    keep_local = local_keys(global_model, method)
    expected = {k: v for k, v in global_state.items() if k not in keep_local}
    updates: list[ClientUpdate] = []
    results: list[LocalResult] = []
    failed: dict[int, str] = {}
    client_scalars: dict[str, dict[str, float]] = {}
    movements: dict[int, float] = {}
    measure = guards.validation.max_norm_ratio > 0  # the norm check's inputs cost a pass
    for position, client_id in enumerate(clients):
        fault = draw_fault(
            guards.faults, seed=schedule.seed, round_index=round_index, client_id=client_id
        )
        if fault == "crash":
            failed[client_id] = "crashed"
            continue
        client_model.load_state_dict(global_state)
        stored = store.get(client_id)
        origin: Mapping[str, torch.Tensor] = expected
        if hooks is not None:
            hooks.begin_client(client_model, stored, client_id=client_id, round_index=round_index)
            if measure:
                # A stateful method may start a client away from the global model (FedEMA's
                # mix): its movement is measured from where it started.
                origin = {
                    k: v.detach().clone()
                    for k, v in client_model.state_dict().items()
                    if k in expected
                }
        result = local_train(
            client_model,
            method,
            images,
            client_indices[client_id],
            settings=round_settings,
            generator=generator(
                schedule.seed, CLIENT, round_index, client_id, device=images.device
            ),
            client_id=client_id,
            position=position,
            after_step=hooks.after_step if hooks is not None else None,
        )
        results.append(result)
        if on_client is not None:
            on_client(round_index, position, len(clients), result)
        if not result.finite:
            failed[client_id] = "local loss is NaN or infinite"
            continue
        payload: dict[str, torch.Tensor] = {}
        if hooks is not None:
            kept, payload = hooks.end_client(
                client_model, stored, client_id=client_id, round_index=round_index
            )
            store.put(client_id, stamp_participation(kept, stored, round_index))
            if kept.scalars:
                client_scalars[str(client_id)] = dict(kept.scalars)
        if fault is not None:
            failed[client_id] = "missed the deadline" if fault == "straggle" else "update lost"
            continue
        if result.num_batches == 0:
            continue
        state = {
            k: v.detach().clone() for k, v in client_model.state_dict().items() if k in expected
        }
        reason = check_update(expected, state)
        if reason is not None:
            failed[client_id] = f"rejected: {reason}"
            continue
        updates.append(
            ClientUpdate(client_id, state, float(result.num_batches), payload, result.loss)
        )
        if measure:
            movements[client_id] = update_distance(origin, state) / result.num_batches
    new_state, record = conclude_round(
        round_index,
        method=method,
        global_state=global_state,
        clients=clients,
        lr=lr,
        results=results,
        updates=updates,
        failed=failed,
        guards=guards,
        started=start,
        movements=movements,
    )
    if new_state is not None:
        global_model.load_state_dict(new_state)
    if client_scalars:
        record["client_state"] = client_scalars
    return record


def conclude_round(
    round_index: int,
    *,
    method: Method,
    global_state: Mapping[str, torch.Tensor],
    clients: list[int],
    lr: float,
    results: Sequence[LocalResult],
    updates: list[ClientUpdate],
    failed: dict[int, str],
    guards: Guards,
    started: float,
    movements: Mapping[int, float] | None = None,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The server half of a round once the clients' checked updates are in (shared with the
    Flower strategy): drop norm outliers, stop on divergence, skip a round with too few
    updates, aggregate with the method, check the result.

    Args:
        round_index: The 0-based round.
        method: Aggregates the accepted updates.
        global_state: The global state the round started from.
        clients: The sampled client ids.
        lr: The round's learning rate.
        results: Every client's local result (those that trained), in sample order.
        updates: The checked updates, in sample order.
        failed: Client id -> reason; outliers are added to it.
        guards: Fault and validation settings.
        started: ``time.perf_counter()`` when the round started.
        movements: Client id -> distance its weights moved in local training, per local step
            (the norm check's measure); None measures each update from ``global_state``.

    Returns:
        The new global state (None when the round was skipped) and the round's record.

    Raises:
        TrainingDiverged: Every trained client's loss was non-finite, or the aggregate is.
        PrivacyBudgetExhausted: This round would exceed ``privacy.target_epsilon``.
    """
    if movements is None and guards.validation.max_norm_ratio > 0:
        movements = {
            u.client_id: update_distance(global_state, u.state) / u.weight for u in updates
        }
    updates = _drop_outliers(updates, movements or {}, guards.validation, failed)
    trained = [r for r in results if r.num_batches > 0]
    if trained and not any(r.finite for r in trained):
        raise TrainingDiverged(
            f"training diverged in round {round_index + 1}: every client's local loss was NaN "
            "or infinite; lower federation.lr (the last good checkpoint, if any, is kept)."
        )
    skipped = len(updates) < max(1, guards.faults.min_clients)
    new_state = None
    privacy_record: dict[str, Any] = {}
    if not skipped:
        if guards.privacy is not None:
            guards.privacy.check_budget(round_index)
            new_state, privacy_record = guards.privacy.aggregate(
                global_state, updates, round_index=round_index
            )
        else:
            new_state = aggregate_updates(method, global_state, updates, round_index=round_index)
        if not _finite(new_state):
            raise TrainingDiverged(
                f"training diverged in round {round_index + 1}: the aggregated global model holds "
                "NaN or infinite values; lower federation.lr (the last good checkpoint, if any, "
                "is kept)."
            )
    record = _round_record(round_index, clients, lr, results)
    record["accepted"] = len(updates)
    record["failed"] = {str(k): v for k, v in sorted(failed.items())}
    record["skipped"] = skipped
    record["seconds"] = time.perf_counter() - started
    if guards.privacy is not None:
        record.update(privacy_record or guards.privacy.idle(round_index))
    return new_state, record


def _finite(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating-point entry is finite (one device sync for the whole state)."""
    checks = [torch.isfinite(v).all() for v in state.values() if v.is_floating_point()]
    return not checks or bool(torch.stack(checks).all())


def _drop_outliers(
    updates: list[ClientUpdate],
    movements: Mapping[int, float],
    validation: ValidationConfig,
    failed: dict[int, str],
) -> list[ClientUpdate]:
    """``updates`` without those whose movement per local step is an outlier.

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
        failed[updates[i].client_id] = (
            f"rejected: update moved {steps[i]:.3g} per local step, more than "
            f"{validation.max_norm_ratio:g} times the median of the others"
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
