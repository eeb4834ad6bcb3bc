"""FedDecorr as an add-on to FedAlignUniform (Shi et al., ICLR 2023, arXiv:2210.00226).

Shi, Liang, Zhang, Feng, Zhou, "Towards Understanding and Mitigating Dimensional Collapse in
Heterogeneous Federated Learning", ICLR 2023, arXiv:2210.00226.

Heterogeneous data collapses local representations into a few dimensions. FedDecorr pushes the
batch correlation matrix of the standardised representations toward the identity. As an add-on
(SSD's table): ``L = L_AU + beta * reduce_views L_decorr(h^(v))`` with beta = 0.01, FedAvg on the
server, no per-client state.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from fedssd.methods.protocol import MethodContext, require
from fedssd.methods.views import (
    AlignUniformOptions,
    align_uniform_loss,
    forward_views,
    full_precision,
)


@dataclasses.dataclass(frozen=True)
class FedDecorrOptions(AlignUniformOptions):
    """Options of FedDecorr on FedAlignUniform (defaults: docs/methods.md, ``feddecorr``).

    Attributes:
        uniformity_weight: Weight beta of the uniformity term of the base objective (inherited).
        uniformity_t: Temperature t of the uniformity term (inherited).
        decorr_weight: Weight of the decorrelation term (0.01 in SSD's runs; the FedDecorr paper
            used 0.1 on CIFAR-10 for supervised learning).
        decorr_on: ``h`` (the encoder output, the evaluated representation) or ``u`` (the raw
            projector output, where FedU2's BYOL client applies it) [I].
        decorr_view_reduce: ``mean`` or ``sum`` of the two views' terms [I].
        decorr_form: ``code`` (the released loss: mean squared off-diagonal entry of
            ``Xs^T Xs`` divided by the batch size; grows about linearly with the batch) or
            ``paper`` (``||K||_F^2 / C^2`` of the correlation matrix K).
        decorr_eps: The epsilon inside the square root of the standardisation.
    """

    decorr_weight: float = 0.01
    decorr_on: Literal["h", "u"] = "h"
    decorr_view_reduce: Literal["mean", "sum"] = "mean"
    decorr_form: Literal["code", "paper"] = "code"
    decorr_eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.decorr_weight >= 0, "method.decorr_weight must be >= 0")
        require(self.decorr_eps > 0, "method.decorr_eps must be > 0")


def standardize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Columns centred and divided by ``sqrt(unbiased variance + eps)``.

    Args:
        x: ``(batch, channels)`` features, batch >= 2.
        eps: Added to the variance inside the square root (a constant column becomes 0, not NaN).

    Returns:
        ``(batch, channels)`` z-scored features.
    """
    centred = x - x.mean(dim=0, keepdim=True)
    variance = centred.pow(2).sum(dim=0, keepdim=True) / (x.shape[0] - 1)
    return centred / torch.sqrt(variance + eps)


def decorrelation_loss(
    x: torch.Tensor, *, eps: float = 1e-8, form: Literal["code", "paper"] = "code"
) -> torch.Tensor:
    """FedDecorr's regulariser on a batch of features.

    ``code`` (the released loss): ``G = Xs^T Xs``, ``(1/N) * mean_{i != j} G_ij^2``, which equals
    ``((N-1)^2 / N) * mean_{i != j} rho_ij^2`` (rho the Pearson correlation). ``paper``:
    ``(1/C^2) ||K||_F^2`` with ``K = G / (N - 1)`` (diagonal included). A batch of one gives 0.

    Args:
        x: ``(batch, channels)`` features; computed in float32.
        eps: See :func:`standardize`.
        form: ``code`` or ``paper``.

    Returns:
        A scalar tensor.
    """
    n, c = x.shape
    if n < 2:
        return x.sum() * 0.0
    xs = standardize(x.float(), eps)
    gram = xs.T @ xs
    if form == "paper":
        return (gram / (n - 1)).pow(2).sum() / c**2
    off_diagonal = gram.pow(2).sum() - gram.diagonal().pow(2).sum()
    # One channel has no off-diagonal entry: nothing to decorrelate.
    return off_diagonal / max(c * (c - 1), 1) / n


class FedDecorr:
    """FedAlignUniform plus the decorrelation regulariser; FedAvg on the server."""

    def __init__(self, options: FedDecorrOptions, context: MethodContext) -> None:
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
        opts = self.options
        out = forward_views(model, view1, view2)
        with full_precision(view1.device):
            loss, parts = align_uniform_loss(
                out, uniformity_weight=opts.uniformity_weight, t=opts.uniformity_t
            )
            features = out.h if opts.decorr_on == "h" else out.z_raw
            terms = [
                decorrelation_loss(x, eps=opts.decorr_eps, form=opts.decorr_form) for x in features
            ]
            decorr = terms[0] + terms[1]
            if opts.decorr_view_reduce == "mean":
                decorr = decorr / 2
            parts["decorr"] = decorr.detach()
            return loss + opts.decorr_weight * decorr, parts
