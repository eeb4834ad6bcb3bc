"""HSD: hard separation, the ablation of SSD (docs/methods.md, ``hsd``).

Fang, Lin, King, Zhang, "Soft Separation and Distillation: Toward Global Uniformity in Federated
Unsupervised Learning", ICCV 2025, arXiv:2508.01251 (project page: "constrain each client to a
distinct, client-specific subspace ... the highest uniformity, but at the cost of reduced
alignment"). No released code has it; this is the spec's realisation [I].

Client k gets the same scaling set as in SSD (a disjoint set S_k of m = floor(d / K) columns of a
shared random orthonormal basis Q, keyed by client id), and its embedding is confined to their span
before normalisation: ``z = normalize(u Q_k Q_k^T)``. FedAlignUniform's loss is computed on these z
in both views; FedAvg on the server. Embeddings of different clients are exactly orthogonal.
Mode ``dsr_limit`` instead keeps the usual z and adds DSR's penalty with the hard projector as
target (DSR with alpha -> infinity).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from fedssd import losses
from fedssd.methods.protocol import MethodContext, require
from fedssd.methods.ssd import check_saved_sets, draw_scaling_sets, sets_state
from fedssd.methods.views import (
    AlignUniformOptions,
    ViewOutputs,
    align_uniform_loss,
    forward_views,
    full_precision,
)


@dataclasses.dataclass(frozen=True)
class HSDOptions(AlignUniformOptions):
    """Options of HSD (docs/methods.md, ``hsd``).

    Attributes:
        uniformity_weight: Weight beta of the uniformity term (inherited).
        uniformity_t: Temperature t of the uniformity term (inherited).
        hsd_mode: ``project`` (the embedding is confined to the client's subspace) or
            ``dsr_limit`` (DSR's released-form penalty toward the hard projection) [I].
        hsd_weight: Weight of the ``dsr_limit`` penalty.
        hsd_keying: ``client_id`` (each client keeps its subspace for the whole run) or
            ``position`` (the subspace of the client's position in the round's sample, as SSD's
            released code keys its sets).
    """

    hsd_mode: Literal["project", "dsr_limit"] = "project"
    hsd_weight: float = 1.0
    hsd_keying: Literal["client_id", "position"] = "client_id"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.hsd_weight >= 0, "method.hsd_weight must be >= 0")


def subspace_basis(basis: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """``(d, m)`` the columns ``dims`` of the orthonormal ``basis`` (client k's Q_k)."""
    return basis[:, dims]


def project_to_subspace(u: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``u Q_k Q_k^T``: the orthogonal projection of each row onto ``span(Q_k)``.

    Args:
        u: ``(batch, d)`` raw embeddings.
        columns: ``(d, m)`` orthonormal columns Q_k.
    """
    return (u @ columns) @ columns.T


def hard_separated_embedding(u: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """HSD's embedding ``normalize(u Q_k Q_k^T)``: unit rows inside the client's subspace."""
    return losses.normalize(project_to_subspace(u, columns))


def hard_dsr_penalty(z: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``||Z - stopgrad(normalize(Z Q_k Q_k^T))||_F / N`` (DSR's released form, alpha -> inf).

    Args:
        z: ``(batch, d)`` unit-norm embeddings.
        columns: ``(d, m)`` orthonormal columns Q_k.
    """
    target = hard_separated_embedding(z, columns).detach()
    return (z - target).pow(2).sum().sqrt() / z.shape[0]


class HSD:
    """FedAlignUniform with each client confined to its own subspace; FedAvg on the server."""

    def __init__(self, options: HSDOptions, context: MethodContext) -> None:
        self.options = options
        self.sets = draw_scaling_sets(
            embed_dim=context.embed_dim, num_clients=context.num_clients, seed=context.seed
        )
        basis = self.sets.basis.to(context.device)
        # (K, d, m): every client's columns, gathered once.
        self._columns = torch.stack(
            [
                subspace_basis(basis, self.sets.dims[k].to(context.device))
                for k in range(context.num_clients)
            ]
        )

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
        columns = self._columns[client_id if opts.hsd_keying == "client_id" else position]
        out = forward_views(model, view1, view2)
        with full_precision(view1.device):
            if opts.hsd_mode == "project":
                z1, z2 = (hard_separated_embedding(u, columns) for u in out.z_raw)
                confined = ViewOutputs(h=out.h, z_raw=out.z_raw, z=(z1, z2))
                return align_uniform_loss(
                    confined, uniformity_weight=opts.uniformity_weight, t=opts.uniformity_t
                )
            loss, parts = align_uniform_loss(
                out, uniformity_weight=opts.uniformity_weight, t=opts.uniformity_t
            )
            penalty = (
                hard_dsr_penalty(out.z[0], columns) + hard_dsr_penalty(out.z[1], columns)
            ) / 2
            parts["hsd"] = penalty.detach()
            return loss + opts.hsd_weight * penalty, parts

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The subspace assignment (saved so that a run can be inspected or resumed)."""
        return sets_state(self.sets, "hsd")

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Check that saved subspaces are the ones this run draws from its seed.

        Raises:
            ConfigError: The saved assignment differs (the checkpoint belongs to another run).
        """
        check_saved_sets(self.sets, state, prefix="hsd", what="HSD subspaces")
