"""One client's part of a round, the same for the in-process simulator and the Flower ClientApp.

Load the global weights into the client model, the method's ``begin_client`` hook with the state
the client kept, :func:`~fedssd.federation.client.local_train` with the client's generator for
this round, ``end_client``, the participation stamp, and the trained weights without the keys
that stay on the client (:func:`~fedssd.federation.server.local_keys`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fedssd.federation.client import LocalResult, LocalSettings, local_train
from fedssd.federation.server import local_keys
from fedssd.methods.protocol import ClientHooks, ClientState, Method
from fedssd.runs.store import stamp_participation
from fedssd.seeding import CLIENT, generator


@dataclasses.dataclass(frozen=True)
class ClientReply:
    """What one client's round produced.

    Attributes:
        result: The local training result.
        state: The trained weights without the client's local keys (detached copies); None
            when the local loss was not finite (a diverged client sends no weights).
        payload: The method's extra tensors for the server (``end_client``'s second value).
        kept: What the client keeps for its next round, stamped with this round; None when
            it keeps nothing new (a method without client hooks, or a diverged client).
        origin: Where the trained weights started when the method's ``begin_client`` may move
            them away from the global weights (asked for with ``measure_origin``); None means
            they started at the global weights.
    """

    result: LocalResult
    state: dict[str, torch.Tensor] | None
    payload: dict[str, torch.Tensor]
    kept: ClientState | None
    origin: dict[str, torch.Tensor] | None = None


def client_round(
    model: nn.Module,
    method: Method,
    images: torch.Tensor,
    indices: torch.Tensor,
    *,
    global_state: Mapping[str, torch.Tensor],
    stored: ClientState | None,
    settings: LocalSettings,
    seed: int,
    round_index: int,
    client_id: int,
    position: int,
    measure_origin: bool = False,
    on_trained: Callable[[LocalResult], None] | None = None,
) -> ClientReply:
    """Run one client's local round on ``model`` (see the module docstring).

    Args:
        model: The client model (reused between clients; its weights are replaced).
        method: The federated method.
        images: ``(n, channels, height, width)`` uint8 images on the training device.
        indices: This client's indices into ``images``, on the same device.
        global_state: The global weights of this round.
        stored: What this client kept from its last round (None: it has not trained yet).
        settings: Local training settings, with this round's learning rate.
        seed: The run seed (the client's generator is drawn from it, the round and its id).
        round_index: The 0-based round.
        client_id: The client's id.
        position: The client's position in the round's sample.
        measure_origin: Copy the weights after ``begin_client`` into ``ClientReply.origin``
            (the norm check measures a client's movement from where it started).
        on_trained: Called with the local result right after training.
    """
    model.load_state_dict(global_state)
    hooks = method if isinstance(method, ClientHooks) else None
    private = local_keys(model, method)
    origin = None
    if hooks is not None:
        hooks.begin_client(model, stored, client_id=client_id, round_index=round_index)
        if measure_origin:
            # A stateful method may start a client away from the global model (FedEMA's mix).
            origin = _shared_copy(model, private)
    result = local_train(
        model,
        method,
        images,
        indices,
        settings=settings,
        generator=generator(seed, CLIENT, round_index, client_id, device=images.device),
        client_id=client_id,
        position=position,
        after_step=hooks.after_step if hooks is not None else None,
    )
    if on_trained is not None:
        on_trained(result)
    if not result.finite:
        return ClientReply(result, None, {}, None, origin)
    payload: dict[str, torch.Tensor] = {}
    kept = None
    if hooks is not None:
        kept, payload = hooks.end_client(
            model, stored, client_id=client_id, round_index=round_index
        )
        kept = stamp_participation(kept, stored, round_index)
    return ClientReply(result, _shared_copy(model, private), payload, kept, origin)


def _shared_copy(model: nn.Module, private: frozenset[str]) -> dict[str, torch.Tensor]:
    """Detached copies of the model's entries that leave the client."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in private}
