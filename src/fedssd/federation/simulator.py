"""The in-process federated simulator: the round loop.

sample clients -> for each: load the global weights into one reused client model, train locally ->
``method.aggregate`` -> callbacks (evaluate, log, progress). The loop never learns a method's name.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedssd.federation.client import LocalResult, LocalSettings, local_train
from fedssd.federation.sampling import sample_clients
from fedssd.methods.protocol import ClientUpdate, Method
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


def round_lr(schedule: Schedule, round_index: int) -> float:
    """Learning rate of round ``round_index`` (0-based)."""
    if schedule.lr_schedule == "cosine":
        return schedule.lr * 0.5 * (1 + math.cos(math.pi * round_index / schedule.rounds))
    return schedule.lr


def run_rounds(
    *,
    global_model: nn.Module,
    client_model: nn.Module,
    method: Method,
    images: torch.Tensor,
    client_indices: Sequence[torch.Tensor],
    schedule: Schedule,
    settings: LocalSettings,
    callbacks: Sequence[Callback] = (),
    on_client: ClientCallback | None = None,
) -> list[dict[str, Any]]:
    """Run every round and return one record per round.

    Args:
        global_model: Holds the global weights; updated in place after each round.
        client_model: A second model of the same shape, reused for every client.
        method: The federated method.
        images: ``(n, channels, height, width)`` uint8 dataset on the training device.
        client_indices: One int64 index tensor per client, on the same device.
        schedule: Rounds, sampling and learning-rate schedule.
        settings: Local training settings (its ``lr`` is replaced by each round's).
        callbacks: Called after each round with the record and the global model.
        on_client: Called after each client's local training (progress within long rounds).

    Returns:
        Records with ``round`` (1-based), ``clients``, ``lr``, ``loss``, ``loss_<part>``,
        ``seconds`` and whatever the callbacks added.
    """
    history: list[dict[str, Any]] = []
    for round_index in range(schedule.rounds):
        start = time.perf_counter()
        clients = sample_clients(
            num_clients=schedule.num_clients,
            fraction=schedule.fraction,
            round_index=round_index,
            seed=schedule.seed,
        )
        lr = round_lr(schedule, round_index)
        round_settings = dataclasses.replace(settings, lr=lr)
        global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
        updates: list[ClientUpdate] = []
        results: list[LocalResult] = []
        for position, client_id in enumerate(clients):
            client_model.load_state_dict(global_state)
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
            )
            results.append(result)
            if on_client is not None:
                on_client(round_index, position, len(clients), result)
            if result.num_batches > 0:
                state = {k: v.detach().clone() for k, v in client_model.state_dict().items()}
                updates.append(ClientUpdate(client_id, state, float(result.num_batches)))
        if updates:
            global_model.load_state_dict(method.aggregate(global_state, updates))
        record = _round_record(round_index, clients, lr, results)
        record["seconds"] = time.perf_counter() - start
        for callback in callbacks:
            extra = callback(record, global_model)
            if extra:
                record.update(extra)
        history.append(record)
    return history


def _round_record(
    round_index: int, clients: list[int], lr: float, results: Sequence[LocalResult]
) -> dict[str, Any]:
    """Batch-weighted mean loss and parts over the round's clients."""
    steps = sum(r.num_batches for r in results)
    record: dict[str, Any] = {"round": round_index + 1, "clients": clients, "lr": lr}
    if steps == 0:
        record["loss"] = float("nan")
        return record
    record["loss"] = sum(r.loss * r.num_batches for r in results) / steps
    names = sorted({name for r in results for name in r.parts})
    for name in names:
        record[f"loss_{name}"] = (
            sum(r.parts.get(name, 0.0) * r.num_batches for r in results) / steps
        )
    return record
