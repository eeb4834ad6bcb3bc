"""The client store: what each client keeps between rounds, keyed by its id.

In cross-device runs a client is seen once every few rounds (docs/methods.md, "Per-client
state"), so its state (a target network, a predictor, FedEMA's lambda) must survive the rounds
in between and be saved with the checkpoint. The store is plain data: tensors on the CPU and
numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from fedssd.methods.protocol import ClientState


def stamp_participation(
    kept: ClientState, previous: ClientState | None, round_index: int
) -> ClientState:
    """Mark ``kept`` (what a client keeps after training in ``round_index``) with that round and
    one participation more than ``previous`` (its state before the round, None the first time).

    Returns:
        ``kept``, updated in place.
    """
    kept.last_round = round_index
    kept.participations = (previous.participations if previous else 0) + 1
    return kept


class ClientStore:
    """Per-client :class:`ClientState`, keyed by client id (never by position in a sample)."""

    def __init__(self) -> None:
        self._states: dict[int, ClientState] = {}

    def get(self, client_id: int) -> ClientState | None:
        """The client's state, or None before its first participation."""
        return self._states.get(client_id)

    def put(self, client_id: int, state: ClientState) -> None:
        """Keep ``state`` for ``client_id``, its tensors moved to the CPU."""
        state.tensors = {k: v.detach().to("cpu", copy=True) for k, v in state.tensors.items()}
        self._states[client_id] = state

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._states))

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every client's tensors in one flat map ``"<client id>/<name>"`` (for safetensors)."""
        return {
            f"{client_id}/{name}": tensor
            for client_id in self
            for name, tensor in self._states[client_id].tensors.items()
        }

    def meta(self) -> dict[str, Any]:
        """Every client's scalars and counters as JSON data."""
        return {
            str(client_id): {
                "scalars": dict(state.scalars),
                "last_round": state.last_round,
                "participations": state.participations,
                "tensors": sorted(state.tensors),
            }
            for client_id, state in sorted(self._states.items())
        }

    @classmethod
    def restore(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ClientStore:
        """The store saved by :meth:`meta` and :meth:`tensors`.

        Raises:
            ValueError: The two parts do not describe the same clients.
        """
        store = cls()
        for key, entry in meta.items():
            names = entry["tensors"]
            store._states[int(key)] = ClientState(
                tensors={name: tensors[f"{key}/{name}"] for name in names},
                scalars={str(k): float(v) for k, v in entry["scalars"].items()},
                last_round=int(entry["last_round"]),
                participations=int(entry["participations"]),
            )
        if sum(len(s.tensors) for s in store._states.values()) != len(tensors):
            raise ValueError("the client store's tensors and its index disagree")
        return store
