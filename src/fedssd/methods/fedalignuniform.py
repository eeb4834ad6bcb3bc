"""FedAlignUniform: the alignment and uniformity objective, federated with FedAvg.

Wang & Isola, "Understanding Contrastive Representation Learning through Alignment and Uniformity
on the Hypersphere", ICML 2020, run locally on each client; the base of SSD (Fang et al., ICCV 2025;
docs/methods.md, ``fedalignuniform``).
"""

from __future__ import annotations

import torch
from torch import nn

from fedssd.methods.protocol import MethodContext
from fedssd.methods.views import (
    AlignUniformOptions,
    align_uniform_loss,
    forward_views,
    full_precision,
)


class FedAlignUniform:
    """Local alignment + uniformity; FedAvg on the server (encoder and projector)."""

    def __init__(self, options: AlignUniformOptions, context: MethodContext) -> None:
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
        """See :meth:`fedssd.methods.protocol.Method.local_loss`."""
        out = forward_views(model, view1, view2)
        with full_precision(view1.device):
            return align_uniform_loss(
                out, uniformity_weight=self.options.uniformity_weight, t=self.options.uniformity_t
            )
