"""FedBYOL: BYOL on each client with a per-client EMA target, FedAvg (Grill et al. 2020).

BYOL: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020, arXiv:2006.07733. Federated as in the FedU/FedEMA lineage (Zhuang et al., ICCV 2021,
arXiv:2108.06492; ICLR 2022, arXiv:2204.04385): clients upload the online encoder, projector and
predictor, which the server averages; the target network (encoder + projector) stays on the
client and persists across its participations.

- First participation: the target is a separate copy of the received global online network
  (EasyFL's target-is-the-online-object quirk is not replicated).
- After every optimizer step: ``theta_t <- m theta_t + (1 - m) theta_o``, parameters only.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fedssd.methods.byol_common import PREDICTOR, TargetNetwork, byol_loss
from fedssd.methods.protocol import ClientState, MethodContext, require
from fedssd.models.heads import mlp_predictor


@dataclasses.dataclass(frozen=True)
class BYOLOptions:
    """Options of FedBYOL.

    Attributes:
        target_momentum: EMA momentum m of the target (0.99, EasyFL/FedU2; Orchestra uses 0.996).
        predictor_hidden: Hidden width of the predictor ``d-h-BN-ReLU-d`` (2048 [I]).
    """

    target_momentum: float = 0.99
    predictor_hidden: int = 2048

    def __post_init__(self) -> None:
        require(0 <= self.target_momentum <= 1, "method.target_momentum must be in [0, 1]")
        require(self.predictor_hidden >= 1, "method.predictor_hidden must be >= 1")


class FedBYOL:
    """Local BYOL against the client's own EMA target; FedAvg on the server (online network)."""

    local_modules: frozenset[str] = frozenset()

    def __init__(self, options: BYOLOptions, context: MethodContext) -> None:
        self.options = options
        self.embed_dim = context.embed_dim
        self.target = TargetNetwork(options.target_momentum)

    def extra_modules(self) -> dict[str, nn.Module]:
        """The predictor (uploaded and averaged)."""
        return {PREDICTOR: mlp_predictor(self.embed_dim, hidden_dim=self.options.predictor_hidden)}

    def begin_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> None:
        """Load the client's target (or copy the global online network at first contact)."""
        self.target.load(model, stored)

    def after_step(self, model: nn.Module) -> None:
        """EMA update of the target."""
        self.target.step(model)

    def end_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> tuple[ClientState, dict[str, torch.Tensor]]:
        """Keep the target; nothing extra is sent."""
        return ClientState(tensors=self.target.tensors()), {}

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
