"""FedEMA: BYOL with a divergence-aware EMA of the local model (Zhuang et al., ICLR 2022).

Zhuang, Wen, Zhang, "Divergence-aware Federated Self-Supervised Learning", ICLR 2022
(openreview oVE1z8NlNe), arXiv:2204.04385.

Each client trains BYOL against its own EMA target and uploads the online encoder, projector and
predictor (FedAvg). Instead of overwriting its online network with the global one, a returning
client interpolates, keeping more of its own model the more it has diverged:

    mu_k = min(lambda_k * Div_k, 1),   W_k <- mu_k W_k + (1 - mu_k) W_g

for the encoder, projector and predictor parameters ("dynamic DAPU"), Div_k the mean per-layer L2
distance of the encoder conv weights between the received global model and the client's last
local model. ``lambda_k = tau / Div_k^first`` is calibrated once, at the first participation, so
that a client whose divergence stays at that value gets ``mu = tau`` (tau = 0.7).

Choices the papers and codes leave open are options (docs/methods.md, ``fedema`` and "Per-client
state"): the form of ``Div^first`` (``scaler``), a cap on mu (FedU2's port uses 0.7), the BatchNorm
buffers after the interpolation, and what a client does after missing rounds (``stale_policy``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from fedssd.aggregate import fedavg
from fedssd.methods.byol_common import (
    PREDICTOR,
    TargetNetwork,
    byol_loss,
    divergence,
    divergence_keys,
    strip_prefix,
    subset,
)
from fedssd.methods.protocol import ClientState, ClientUpdate, MethodContext, require
from fedssd.models.heads import mlp_predictor

ONLINE_PREFIX = "online."


@dataclasses.dataclass(frozen=True)
class FedEMAOptions:
    """Options of FedEMA.

    Attributes:
        tau: Target decay of the automatic scaler, ``lambda_k = tau / Div_k^first`` (0.7, the
            EasyFL README command; its ``main.py`` default is 0.8).
        scaler: How lambda_k is set. ``paper`` (default): Div^first is the distance between the
            client's model after its first local training and the global model aggregated at
            the end of that round (computed in :meth:`FedEMA.aggregate`). ``easyfl``: the size of
            the first local update (start vs end of the first local training). ``constant``:
            ``lambda = constant_lambda`` for every client.
        constant_lambda: lambda of the ``constant`` scaler (EasyFL's ``--weight_scaler 1``).
        mu_cap: Upper bound on mu (1, the paper's rule; FedU2's port uses 0.7).
        stale_policy: What a returning client starts from. ``keep`` (the paper's rule):
            interpolate with its stored model however long ago it trained. ``reset_to_global``:
            start from the global model (mu = 0) when more than ``max_staleness`` rounds passed
            since it last trained. ``selective_ema`` (FedU2's port, an EasyFL option): reset
            unless it also trained in the previous round (``reset_to_global`` with
            ``max_staleness = 1``). The target is kept in every case.
        max_staleness: Rounds since the last participation beyond which ``reset_to_global``
            resets (1 = the previous round counts as fresh).
        local_buffers: Take the BatchNorm buffers from the client's stored model instead of the
            global one after the interpolation (FedU2's port); default global [I].
        target_momentum: EMA momentum of the target (0.99).
        predictor_hidden: Hidden width of the predictor ``d-h-BN-ReLU-d`` (2048 [I]).
    """

    tau: float = 0.7
    scaler: Literal["paper", "easyfl", "constant"] = "paper"
    constant_lambda: float = 1.0
    mu_cap: float = 1.0
    stale_policy: Literal["keep", "reset_to_global", "selective_ema"] = "keep"
    max_staleness: int = 1
    local_buffers: bool = False
    target_momentum: float = 0.99
    predictor_hidden: int = 2048

    def __post_init__(self) -> None:
        require(self.tau > 0, "method.tau must be > 0")
        require(self.constant_lambda >= 0, "method.constant_lambda must be >= 0")
        require(0 <= self.mu_cap <= 1, "method.mu_cap must be in [0, 1]")
        require(self.max_staleness >= 1, "method.max_staleness must be >= 1")
        require(0 <= self.target_momentum <= 1, "method.target_momentum must be in [0, 1]")
        require(self.predictor_hidden >= 1, "method.predictor_hidden must be >= 1")


def auto_lambda(tau: float, first_divergence: float) -> float | None:
    """The automatic scaler ``tau / Div^first``; None when the divergence is 0 (no update)."""
    if not first_divergence > 1e-12:
        return None
    return tau / first_divergence


def ema_decay(scaler: float, div: float, cap: float = 1.0) -> float:
    """FedEMA's decay ``mu = min(lambda * Div, cap)`` (cap 1 in the paper)."""
    return min(scaler * div, cap)


def is_stale(options: FedEMAOptions, gap: int) -> bool:
    """Whether a client last seen ``gap`` rounds ago starts from the global model."""
    if options.stale_policy == "selective_ema":
        return gap > 1
    if options.stale_policy == "reset_to_global":
        return gap > options.max_staleness
    return False


@torch.no_grad()
def interpolate_(
    model: nn.Module, local: Mapping[str, torch.Tensor], mu: float, *, local_buffers: bool
) -> None:
    """``W <- mu W_local + (1 - mu) W`` for every parameter of ``model`` (holding the global
    weights); buffers stay global unless ``local_buffers``.

    Args:
        model: The client model, holding the received global weights.
        local: The client's stored model state (same keys as ``model.state_dict()``).
        mu: The decay in [0, 1].
        local_buffers: Copy the stored buffers (BatchNorm statistics) too.
    """
    for name, param in model.named_parameters():
        param.mul_(1 - mu).add_(local[name].to(param.device, param.dtype), alpha=mu)
    if local_buffers:
        for name, buffer in model.named_buffers():
            buffer.copy_(local[name])


class FedEMA:
    """BYOL with a per-client target and the divergence-aware EMA of the local model."""

    local_modules: frozenset[str] = frozenset()

    def __init__(self, options: FedEMAOptions, context: MethodContext) -> None:
        self.options = options
        self.embed_dim = context.embed_dim
        self.target = TargetNetwork(options.target_momentum)
        # Server-side table of lambdas calibrated in aggregate (paper scaler); NaN = not yet.
        self.lambdas = torch.full((context.num_clients,), float("nan"), dtype=torch.float64)
        self._pending: dict[int, int] = {}
        self._keys: list[str] = []
        self._start: dict[str, torch.Tensor] = {}
        self._scalars: dict[str, float] = {}

    def extra_modules(self) -> dict[str, nn.Module]:
        """The predictor (uploaded, averaged and interpolated like the rest)."""
        return {PREDICTOR: mlp_predictor(self.embed_dim, hidden_dim=self.options.predictor_hidden)}

    def scaler_of(self, client_id: int, stored: ClientState | None) -> float | None:
        """lambda_k of a client if it is known (stored, or calibrated by the server)."""
        if self.options.scaler == "constant":
            return self.options.constant_lambda
        if stored is not None and "lambda" in stored.scalars:
            return stored.scalars["lambda"]
        value = float(self.lambdas[client_id])
        return value if math.isfinite(value) else None

    def begin_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> None:
        """Keep the target; interpolate the online network between local and global."""
        self.target.load(model, stored)
        if not self._keys:
            self._keys = divergence_keys(model)
        state = model.state_dict()
        self._start = subset(state, self._keys) if self.options.scaler == "easyfl" else {}
        self._scalars = {}
        local = {} if stored is None else strip_prefix(stored.tensors, ONLINE_PREFIX)
        if stored is None or not local:
            return  # first participation: the global online network as is
        gap = round_index - stored.last_round
        div = divergence(state, local, self._keys)
        scaler = self.scaler_of(client_id, stored)
        if scaler is None:
            # Not calibrated (the first update never reached the server): calibrate now, so that
            # this participation gets mu = tau.
            scaler = auto_lambda(self.options.tau, div)
        mu = (
            0.0
            if scaler is None or is_stale(self.options, gap)
            else ema_decay(scaler, div, self.options.mu_cap)
        )
        interpolate_(model, local, mu, local_buffers=self.options.local_buffers)
        self._scalars = {"divergence": div, "mu": mu, "staleness": float(gap)}
        if scaler is not None:
            self._scalars["lambda"] = scaler

    def after_step(self, model: nn.Module) -> None:
        """EMA update of the target."""
        self.target.step(model)

    def end_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> tuple[ClientState, dict[str, torch.Tensor]]:
        """Keep the online network, the target and lambda; calibrate lambda after a first run."""
        state = model.state_dict()
        tensors = self.target.tensors()
        tensors.update({f"{ONLINE_PREFIX}{k}": v.detach().clone() for k, v in state.items()})
        scalars = dict(self._scalars)
        if "lambda" not in scalars:
            scaler = self.scaler_of(client_id, stored)
            if scaler is None and self.options.scaler == "easyfl":
                scaler = auto_lambda(self.options.tau, divergence(self._start, state, self._keys))
            if scaler is not None:
                scalars["lambda"] = scaler
            elif self.options.scaler == "paper":
                self._pending[client_id] = round_index  # needs the aggregated model
        return ClientState(tensors=tensors, scalars=scalars), {}

    def local_loss(
        self,
        model: nn.Module,
        view1: torch.Tensor,
        view2: torch.Tensor,
        *,
        client_id: int,
        position: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Symmetric BYOL loss against the client's target."""
        return byol_loss(model, self.target, view1, view2)

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
    ) -> dict[str, torch.Tensor]:
        """FedAvg; then lambda_k = tau / Div(new global, W_k) for first-time clients."""
        new_state = fedavg([u.state for u in updates], [u.weight for u in updates])
        for update in updates:
            if self._pending.get(update.client_id) == round_index:
                scaler = auto_lambda(
                    self.options.tau, divergence(new_state, update.state, self._keys)
                )
                if scaler is not None:
                    self.lambdas[update.client_id] = scaler
        self._pending.clear()
        return new_state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The server's table of calibrated lambdas, ``(num_clients,)`` (NaN = not yet)."""
        return {"lambdas": self.lambdas.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the table of lambdas."""
        if "lambdas" in state:
            self.lambdas = state["lambdas"].detach().to("cpu", torch.float64).clone()
