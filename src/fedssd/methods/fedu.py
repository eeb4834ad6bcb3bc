"""FedU: BYOL with the divergence-aware predictor update (DAPU).

Zhuang et al., ICCV 2021.

Zhuang, Gan, Wen, Zhang, Yi, "Collaborative Unsupervised Visual Representation Learning from
Decentralized Data", ICCV 2021, arXiv:2108.06492.

Each client trains BYOL against its own EMA target. It uploads the online encoder, projector and
predictor (all averaged by FedAvg). At the start of a round it takes the global encoder and
projector, keeps its target, and takes the global predictor only when its divergence from the
global model is below the threshold mu; otherwise it keeps its own predictor:

    predictor <- global if Div_k < mu else local,   Div_k = (1/|C|) sum_l ||W_g^l - W_k^l||_2

over the encoder's conv weights C (:func:`fedssd.methods.byol_common.divergence_keys`).

``div_form`` chooses which W_k: ``paper`` (default; FedU2's port) compares the received global
encoder with the client's encoder after its last local training, so the divergence grows with the
time since the client last took part; ``easyfl`` (the released code) uses the size of the client's
own last update (start vs end of its last local training), which does not grow with staleness.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from fedssd.methods.byol_common import (
    PREDICTOR,
    TargetNetwork,
    byol_loss,
    divergence,
    divergence_keys,
    predictor_of,
    strip_prefix,
    subset,
)
from fedssd.methods.protocol import ClientState, MethodContext, require
from fedssd.models.heads import mlp_predictor

PREDICTOR_PREFIX = "predictor."
LAST_PREFIX = "last."


@dataclasses.dataclass(frozen=True)
class FedUOptions:
    """Options of FedU.

    Attributes:
        dapu_threshold: Divergence threshold mu below which the global predictor is taken (0.4,
            EasyFL's ``--dapu_threshold``; tuned for ResNet-18 at lr 0.032).
        div_form: ``paper`` (received global vs the client's last local encoder) or ``easyfl``
            (size of the client's last local update) [I].
        target_momentum: EMA momentum of the target (0.99).
        predictor_hidden: Hidden width of the predictor ``d-h-BN-ReLU-d`` (2048 [I]).
    """

    dapu_threshold: float = 0.4
    div_form: Literal["paper", "easyfl"] = "paper"
    target_momentum: float = 0.99
    predictor_hidden: int = 2048

    def __post_init__(self) -> None:
        require(self.dapu_threshold >= 0, "method.dapu_threshold must be >= 0")
        require(0 <= self.target_momentum <= 1, "method.target_momentum must be in [0, 1]")
        require(self.predictor_hidden >= 1, "method.predictor_hidden must be >= 1")


def dapu_keeps_local(div: float, threshold: float) -> bool:
    """FedU's predictor rule: keep the local predictor unless ``div < threshold``."""
    return not div < threshold


class FedU:
    """BYOL with a per-client target and the divergence-aware predictor update; FedAvg on the
    server (encoder, projector and predictor)."""

    local_modules: frozenset[str] = frozenset()

    def __init__(self, options: FedUOptions, context: MethodContext) -> None:
        self.options = options
        self.embed_dim = context.embed_dim
        self.target = TargetNetwork(options.target_momentum)
        self._keys: list[str] = []
        self._start: dict[str, torch.Tensor] = {}
        self._decision: dict[str, float] = {}

    def extra_modules(self) -> dict[str, nn.Module]:
        """The predictor (uploaded and averaged; kept locally when the client diverged)."""
        return {PREDICTOR: mlp_predictor(self.embed_dim, hidden_dim=self.options.predictor_hidden)}

    def begin_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> None:
        """Keep the client's target; choose the global or the client's predictor (DAPU)."""
        self.target.load(model, stored)
        if not self._keys:
            self._keys = divergence_keys(model)
        state = model.state_dict()
        self._start = subset(state, self._keys) if self.options.div_form == "easyfl" else {}
        self._decision = {}
        local_predictor = {} if stored is None else strip_prefix(stored.tensors, PREDICTOR_PREFIX)
        if stored is None or not local_predictor:
            return  # first participation: the global predictor as is
        last = strip_prefix(stored.tensors, LAST_PREFIX)
        if self.options.div_form == "paper" and last:
            div = divergence(state, last, self._keys)
        elif self.options.div_form == "easyfl" and "next_divergence" in stored.scalars:
            div = stored.scalars["next_divergence"]
        else:
            return  # saved under the other form: treated as a first participation
        keep = dapu_keeps_local(div, self.options.dapu_threshold)
        if keep:
            predictor_of(model).load_state_dict(local_predictor)
        self._decision = {"divergence": div, "kept_local_predictor": float(keep)}

    def after_step(self, model: nn.Module) -> None:
        """EMA update of the target."""
        self.target.step(model)

    def end_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> tuple[ClientState, dict[str, torch.Tensor]]:
        """Keep the target, the predictor and what the next divergence needs."""
        state = model.state_dict()
        tensors = self.target.tensors()
        tensors.update(
            {
                f"{PREDICTOR_PREFIX}{k}": v.detach().clone()
                for k, v in predictor_of(model).state_dict().items()
            }
        )
        scalars = dict(self._decision)
        if self.options.div_form == "paper":
            tensors.update(subset(state, self._keys, prefix=LAST_PREFIX))
        else:
            scalars["next_divergence"] = divergence(self._start, state, self._keys)
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
