"""The server's view of a method: its aggregate and its state, with the defaults filled in.

A method only has to define ``local_loss`` (:class:`~fedssd.methods.protocol.Method`); callers
(the simulator, the Flower strategy and client, checkpoints) go through these functions, so a
method without :class:`~fedssd.methods.protocol.Aggregates` is averaged by FedAvg and one without
:class:`~fedssd.methods.protocol.HasServerState` has an empty server state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedssd.aggregate import fedavg
from fedssd.errors import ConfigError
from fedssd.methods.protocol import Aggregates, ClientUpdate, HasServerState, Method


def aggregate_updates(
    method: Method,
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    *,
    round_index: int,
) -> dict[str, torch.Tensor]:
    """The next global state from this round's accepted updates.

    The method's own :meth:`~fedssd.methods.protocol.Aggregates.aggregate` when it has one; else
    FedAvg of the updates' states weighted by ``u.weight`` (McMahan et al. 2017), with every entry
    of ``global_state`` that no update carries (a method's client-only modules) kept as it was.

    Args:
        method: The run's method.
        global_state: The global state the round started from (every key of the model).
        updates: The accepted updates (at least one), each with the same keys.
        round_index: The 0-based round.

    Returns:
        A state dict with every key of ``global_state``, in its order.
    """
    if isinstance(method, Aggregates):
        return method.aggregate(global_state, updates, round_index=round_index)
    return fedavg_updates(global_state, updates)


def fedavg_updates(
    global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
) -> dict[str, torch.Tensor]:
    """FedAvg of the updates' states weighted by ``u.weight``, with every entry of
    ``global_state`` that no update carries (a method's client-only modules) kept as it was.

    Args:
        global_state: The global state the round started from (every key of the model).
        updates: The accepted updates (at least one), each with the same keys.

    Returns:
        A state dict with every key of ``global_state``, in its order.
    """
    averaged = fedavg([u.state for u in updates], [u.weight for u in updates])
    return {k: averaged.get(k, v) for k, v in global_state.items()}


def server_state(method: Method) -> dict[str, torch.Tensor]:
    """The method's server-side state (empty for a method without :class:`HasServerState`)."""
    return method.state_dict() if isinstance(method, HasServerState) else {}


def load_server_state(method: Method, state: Mapping[str, torch.Tensor]) -> None:
    """Restore the server-side state saved by :func:`server_state` (resume, Flower clients).

    Raises:
        ConfigError: ``state`` is not empty but the method keeps no server state (it was saved
            by another method).
    """
    if isinstance(method, HasServerState):
        method.load_state_dict(state)
    elif state:
        raise ConfigError(
            f"the saved server state ({', '.join(sorted(state))}) belongs to a method that keeps "
            f"one, but {type(method).__name__} keeps none; resume only the run that wrote it."
        )
