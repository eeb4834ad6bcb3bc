"""FedSimCLR: SimCLR's NT-Xent loss on each client, FedAvg on the server (Chen et al. 2020).

SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, arXiv:2002.05709. Federated as in the FedU/FedEMA lineage (Zhuang et
al., ICCV 2021, arXiv:2108.06492; ICLR 2022, arXiv:2204.04385): local NT-Xent on the projector
outputs of the two views, FedAvg of encoder and projector. No per-client state.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fedssd import losses
from fedssd.methods.protocol import MethodContext, require
from fedssd.methods.views import forward_views, full_precision


@dataclasses.dataclass(frozen=True)
class SimCLROptions:
    """Options of FedSimCLR.

    Attributes:
        temperature: NT-Xent temperature tau. 0.07 as in EasyFL, FedU2 and the SSD code lineage
            (FedX and Orchestra use 0.1, centralised CIFAR SimCLR 0.5) [I].
    """

    temperature: float = 0.07

    def __post_init__(self) -> None:
        require(self.temperature > 0, "method.temperature must be > 0")


class FedSimCLR:
    """Local NT-Xent; FedAvg on the server (encoder and projector)."""

    def __init__(self, options: SimCLROptions, context: MethodContext) -> None:
        self.options = options

    def local_loss(
        self,
        model: nn.Module,
        view1: torch.Tensor,
        view2: torch.Tensor,
        *,
        client_id: int,
        position: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """NT-Xent of the two views' projector outputs (float32)."""
        out = forward_views(model, view1, view2)
        with full_precision(view1.device):
            loss = losses.nt_xent(*out.z_raw, temperature=self.options.temperature)
        return loss, {"ntxent": loss.detach()}
