"""What a method is: a local loss plus a server-side aggregation hook (DESIGN.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from fedssd.errors import ConfigError


def require(ok: bool, message: str) -> None:
    """Raise a ConfigError with ``message`` unless ``ok`` (range checks of method options)."""
    if not ok:
        raise ConfigError(f"{message}.")


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """Facts about the run that a method may need when it is built.

    Attributes:
        num_clients: Number of clients K in the federation.
        feature_dim: Width of the encoder output h.
        embed_dim: Width of the projector output z.
        seed: The run seed (methods derive their own random numbers from it).
        device: Where the model trains.
    """

    num_clients: int
    feature_dim: int
    embed_dim: int
    seed: int
    device: torch.device


@dataclasses.dataclass(frozen=True)
class ClientUpdate:
    """What a client sends back after local training.

    Attributes:
        client_id: The client's id (0..K-1).
        state: The client's model state dict after training.
        weight: Its aggregation weight (the number of local mini-batches it trained on).
    """

    client_id: int
    state: Mapping[str, torch.Tensor]
    weight: float


class Method(Protocol):
    """A federated SSL method as the round loop sees it."""

    def local_loss(
        self,
        model: nn.Module,
        view1: torch.Tensor,
        view2: torch.Tensor,
        *,
        client_id: int,
        position: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one local step and its named parts (detached).

        Args:
            model: The client's model, ``model(x) -> (h, z_raw)``.
            view1: ``(batch, channels, height, width)`` first augmented view.
            view2: ``(batch, channels, height, width)`` second augmented view.
            client_id: The client's id.
            position: The client's position in this round's sample.
        """
        ...

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """The next global state from this round's client updates."""
        ...

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's server-side state (saved with the model)."""
        ...


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registry entry: the method's option dataclass, its factory and a one-line summary."""

    options: type
    build: Callable[[Any, MethodContext], Method]
    summary: str
