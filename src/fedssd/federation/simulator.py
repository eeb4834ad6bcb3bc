"""The in-process federated simulator: the round loop.

:func:`~fedssd.federation.server.open_round` (cohort, learning rate, faults) -> for each client:
:func:`~fedssd.federation.round.client_round` (load the global weights into one reused client
model, the method's client hooks, train locally), the server's checks of its reply
(:class:`~fedssd.federation.server.RoundTally`) -> the method's aggregate (FedAvg by default, or
the DP mechanism; :func:`~fedssd.federation.server.conclude_round`) -> callbacks (evaluate, log,
checkpoint, progress). The loop never learns a method's name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedssd.federation.client import LocalResult, LocalSettings
from fedssd.federation.round import client_round
from fedssd.federation.server import (
    Callback,
    Guards,
    Schedule,
    conclude_round,
    local_keys,
    open_round,
    round_lr,
    run_callbacks,
)
from fedssd.methods.protocol import Method
from fedssd.runs.store import ClientStore

# Told after each client's local training: (round index, position, clients this round, result).
ClientCallback = Callable[[int, int, int, LocalResult], None]

__all__ = [
    "Callback",
    "ClientCallback",
    "Guards",
    "Schedule",
    "conclude_round",
    "local_keys",
    "round_lr",
    "run_callbacks",
    "run_round",
    "run_rounds",
]


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
        ``loss``, ``loss_<part>``, ``accepted``, ``failed`` (client id -> why it sent no
        update), ``rejected`` (client id -> why its update was refused), ``skipped``,
        ``client_state`` (client id -> the scalars a stateful method keeps, e.g. FedEMA's
        lambda and mu), ``seconds`` and whatever the callbacks added.

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
    plan = open_round(
        round_index, global_model=global_model, method=method, schedule=schedule, guards=guards
    )
    round_settings = dataclasses.replace(settings, lr=plan.lr)
    measure = guards.validation.max_norm_ratio > 0  # the norm check's inputs cost a pass
    tally = plan.tally(measure=measure)
    client_scalars: dict[str, dict[str, float]] = {}
    for position, client_id in enumerate(plan.clients):
        fault = plan.faults[client_id]
        if fault == "crash":
            tally.failed[client_id] = "crashed"
            continue
        reply = client_round(
            client_model,
            method,
            images,
            client_indices[client_id],
            global_state=plan.global_state,
            stored=store.get(client_id),
            settings=round_settings,
            seed=schedule.seed,
            round_index=round_index,
            client_id=client_id,
            position=position,
            measure_origin=measure,
            on_trained=(
                functools.partial(on_client, round_index, position, len(plan.clients))
                if on_client is not None
                else None
            ),
        )
        if reply.kept is not None:
            store.put(client_id, reply.kept)
            if reply.kept.scalars:
                client_scalars[str(client_id)] = dict(reply.kept.scalars)
        tally.receive(
            client_id,
            fault,
            reply.result,
            functools.partial(dict, reply.state or {}),
            functools.partial(dict, reply.payload),
            origin=(plan.expected if reply.origin is None else reply.origin) if measure else None,
        )
    new_state, record = conclude_round(plan, tally, method=method, guards=guards)
    if new_state is not None:
        global_model.load_state_dict(new_state)
    if client_scalars:
        record["client_state"] = client_scalars
    return record
