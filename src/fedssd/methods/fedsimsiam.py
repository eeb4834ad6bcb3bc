"""FedSimSiam: SimSiam on each client, FedAvg of encoder, projector and predictor.

SimSiam: Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021,
arXiv:2011.10566. Federated as in the FedU/FedEMA lineage (Zhuang et al., ICCV 2021,
arXiv:2108.06492; EasyFL): the predictor is part of the global model and is averaged with the rest
(EasyFL supports only a global predictor for SimSiam). No per-client state.

Loss: ``1/2 D(p1, sg(u2)) + 1/2 D(p2, sg(u1))`` with ``D(p, u) = -cos(p, u)``, ``u`` the raw
projector output and ``p = predictor(u)``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fedssd import losses
from fedssd.methods.byol_common import PREDICTOR, predictor_of
from fedssd.methods.protocol import MethodContext, require
from fedssd.methods.views import full_precision
from fedssd.models.heads import mlp_predictor


@dataclasses.dataclass(frozen=True)
class SimSiamOptions:
    """Options of FedSimSiam.

    Attributes:
        predictor_hidden: Hidden width of the predictor ``d-h-BN-ReLU-d`` (2048, the project
            default [I]; SimSiam's own CIFAR predictor is a 512 bottleneck).
    """

    predictor_hidden: int = 2048

    def __post_init__(self) -> None:
        require(self.predictor_hidden >= 1, "method.predictor_hidden must be >= 1")


class FedSimSiam:
    """Local SimSiam; FedAvg on the server (encoder, projector and predictor)."""

    def __init__(self, options: SimSiamOptions, context: MethodContext) -> None:
        self.options = options
        self.embed_dim = context.embed_dim

    def extra_modules(self) -> dict[str, nn.Module]:
        """The predictor (aggregated with the rest of the model)."""
        return {PREDICTOR: mlp_predictor(self.embed_dim, hidden_dim=self.options.predictor_hidden)}

    def local_loss(
        self,
        model: nn.Module,
        view1: torch.Tensor,
        view2: torch.Tensor,
        *,
        client_id: int,
        position: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Symmetrised negative cosine, stop-gradient on the projection side (float32)."""
        predictor = predictor_of(model)
        _, u1 = model(view1)
        _, u2 = model(view2)
        p1, p2 = predictor(u1).float(), predictor(u2).float()
        with full_precision(view1.device):
            loss = 0.5 * losses.negative_cosine(p1, u2.float()) + 0.5 * losses.negative_cosine(
                p2, u1.float()
            )
        return loss, {"simsiam": loss.detach()}
