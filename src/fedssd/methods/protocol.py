"""What a method is: a local loss plus optional capabilities (docs/methods.md,
"Adding a method").

Only :class:`Method` (``local_loss``) is required. The round loop detects the rest with
``isinstance``, once :func:`check_capabilities` has made sure none is defined in part:
:class:`Aggregates` (a server rule other than FedAvg), :class:`HasServerState`,
:class:`ExtendsModel`, :class:`ClientHooks` and :class:`OrdersSample`; :mod:`fedssd.methods.server`
supplies the defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fedssd.errors import ConfigError


def require(ok: bool, message: str) -> None:
    """Raise a ConfigError with ``message`` unless ``ok`` (range checks of method options)."""
    if not ok:
        raise ConfigError(f"{message}.")


def require_same_state(
    mine: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], message: str
) -> None:
    """Raise a ConfigError with ``message`` unless ``saved`` (moved to the CPU) has the keys of
    ``mine`` and equal tensors (a checkpoint's state that a method redraws from its seed)."""
    on_cpu = {k: v.cpu() for k, v in saved.items()}
    if on_cpu.keys() != mine.keys() or not all(torch.equal(on_cpu[k], v) for k, v in mine.items()):
        raise ConfigError(message)


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
        state: The client's model state after training: every entry of the model's state dict
            except those under the method's local modules (see :class:`ClientHooks`).
        weight: Its aggregation weight (the number of local mini-batches it trained on).
        payload: Extra tensors the method sends beside the weights (e.g. Orchestra's local
            centroids); empty for most methods.
        loss: The client's mean local loss this round.
    """

    client_id: int
    state: Mapping[str, torch.Tensor]
    weight: float
    payload: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    loss: float = float("nan")


@dataclasses.dataclass
class ClientState:
    """What one client keeps between the rounds it takes part in (docs/methods.md, "Per-client
    state").

    Attributes:
        tensors: Named tensors on the CPU (a target network, a predictor, the last local model).
        scalars: Named numbers (FedEMA's lambda, a divergence, a flag).
        last_round: The 0-based round in which the client last trained.
        participations: How many rounds it has trained in.
    """

    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    last_round: int = -1
    participations: int = 0


class Method(Protocol):
    """A federated SSL method as the round loop sees it: the one required part, its local loss."""

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


@runtime_checkable
class Aggregates(Protocol):
    """A method with its own server-side rule; without it the server runs FedAvg
    (:func:`fedssd.methods.server.aggregate_updates`)."""

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
    ) -> dict[str, torch.Tensor]:
        """The next global state (every key of ``global_state``) from this round's updates.

        Entries of ``global_state`` that no update carries (the method's local modules) are
        returned unchanged unless the method computes them (e.g. Orchestra's centroids).
        """
        ...


@runtime_checkable
class HasServerState(Protocol):
    """A method that keeps state on the server (saved in checkpoints, beside the model, and sent
    to Flower clients each round); without it the server state is empty."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's server-side state."""
        ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the server-side state saved by :meth:`state_dict` (on resume)."""
        ...


@runtime_checkable
class ExtendsModel(Protocol):
    """A method whose model has parts beyond encoder and projector (predictor, centroids).

    The modules are attached to the model under ``extras.<name>`` before training, initialised
    from the run seed, so the global and the client model get the same initial weights.
    """

    def extra_modules(self) -> dict[str, nn.Module]:
        """Fresh extra modules by name (built on the CPU; moved with the model)."""
        ...


@runtime_checkable
class ClientHooks(Protocol):
    """A method with per-client state, per-step updates or parts that never leave the client.

    The round loop calls, for each sampled client: load the global weights into the client
    model, :meth:`begin_client`, the local steps (each followed by :meth:`after_step`),
    :meth:`end_client`; what ``end_client`` returns is kept in the client store under the
    client's id (never its position in the sample), which checkpoints save.
    """

    local_modules: frozenset[str]
    """Names of extra modules that stay on the client: not sent, not aggregated."""

    def begin_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> None:
        """Prepare ``model`` (holding the global weights) for local training."""
        ...

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (EMA targets)."""
        ...

    def end_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> tuple[ClientState, dict[str, torch.Tensor]]:
        """The state to keep for this client and the payload to send with its update.

        The round loop sets the returned state's ``last_round`` and ``participations``.
        """
        ...


@runtime_checkable
class OrdersSample(Protocol):
    """A method that may need each round's sample of clients in a random order, drawn from the
    run seed and the round (SSD's position keying follows the released code's order); without
    it the sample is in ascending client id."""

    random_sample_order: bool
    """Whether this method, with its options, wants the random order."""


HOOKS: tuple[str, ...] = ("local_modules", "begin_client", "after_step", "end_client")
"""The members of :class:`ClientHooks`: a method defines all of them or none."""

SERVER_STATE: tuple[str, ...] = ("state_dict", "load_state_dict")
"""The members of :class:`HasServerState`: a method defines both or neither."""


def check_capabilities(method: object) -> None:
    """Check that ``method`` has ``local_loss`` and each capability it starts to define in full.

    The round loop detects a capability with ``isinstance`` on its protocol, so a partial one
    (say ``begin_client``, ``after_step`` and ``end_client`` without ``local_modules``) would be
    silently skipped; this check names the missing members instead.

    Raises:
        TypeError: ``local_loss`` is missing, a capability is partly defined, or
            ``local_modules`` is not a frozenset of names.
    """
    kind = type(method).__name__
    if not callable(getattr(method, "local_loss", None)):
        raise TypeError(f"method {kind} has no local_loss.")
    for capability, members in (("ClientHooks", HOOKS), ("HasServerState", SERVER_STATE)):
        present = [name for name in members if hasattr(method, name)]
        missing = [name for name in members if not hasattr(method, name)]
        if present and missing:
            raise TypeError(
                f"method {kind} defines {', '.join(present)} of {capability} but not "
                f"{', '.join(missing)}; define all of {', '.join(members)} or none."
            )
    callables = ("aggregate", "extra_modules", *HOOKS[1:], *SERVER_STATE)
    for name in callables:
        if hasattr(method, name) and not callable(getattr(method, name)):
            raise TypeError(f"method {kind}'s {name} is not callable.")
    local: object = getattr(method, "local_modules", frozenset())
    if not isinstance(local, frozenset) or not all(isinstance(n, str) for n in local):
        raise TypeError(f"method {kind}'s local_modules must be a frozenset of module names.")
    if isinstance(method, OrdersSample) and not isinstance(method.random_sample_order, bool):
        raise TypeError(f"method {kind}'s random_sample_order must be true or false.")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A registry entry: the method's class, its option dataclass and a one-line summary.

    Attributes:
        method: The class, built as ``method(options, context)``.
        options: The frozen dataclass of its options.
        summary: One line for ``fedssd methods``.
    """

    method: Callable[[Any, MethodContext], Method]
    options: type
    summary: str

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.options):
            raise TypeError(f"the options of a method must be a dataclass, not {self.options}.")

    def build(self, options: Any, context: MethodContext) -> Method:
        """The method built from resolved ``options``, its capabilities checked.

        Raises:
            TypeError: The method defines a capability only in part (:func:`check_capabilities`).
        """
        method = self.method(options, context)
        check_capabilities(method)
        return method
