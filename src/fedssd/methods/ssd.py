"""SSD: Soft Separation and Distillation (Fang, Lin, King, Zhang, ICCV 2025, arXiv:2508.01251).

FedAlignUniform plus two local terms (Fang et al., ICCV 2025; docs/methods.md, ``ssd``):

- Dimension-Scaled Regularization (DSR, soft separation): each client gets its own disjoint set of
  embedding dimensions, drawn once from the run seed, and its embeddings are pulled a little toward
  them, so that after aggregation different clients occupy different regions of the sphere.
- Projector distillation (PD): ties the encoder output h to the projector output z so that the
  uniformity gained in z reaches the representation h.

``L = L_align + beta L_unif + gamma L_DSR + delta L_PD`` with beta = 1, gamma = 1, delta = 0.1.
Switching ``dsr`` or ``pd`` off gives the paper's ablation rows (+PD only, +DSR only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn

from fedssd import losses
from fedssd.errors import ConfigError
from fedssd.methods.protocol import MethodContext, require, require_same_state
from fedssd.methods.views import (
    AlignUniformOptions,
    ViewOutputs,
    align_uniform_loss,
    forward_views,
    full_precision,
)
from fedssd.seeding import SCALING_SETS, numpy_rng


@dataclasses.dataclass(frozen=True)
class SSDOptions(AlignUniformOptions):
    """Options of SSD (defaults are the paper's).

    Attributes:
        uniformity_weight: Weight beta of the uniformity term (inherited).
        uniformity_t: Temperature t of the uniformity term (inherited).
        dsr: Use dimension-scaled regularization (soft separation).
        dsr_weight: Weight gamma of DSR.
        dsr_form: ``released`` (the authors' code, whose numbers are in the paper's tables:
            rotated basis, re-normalised target, Frobenius norm / batch size) or ``paper`` (the
            formula as printed: mean squared distance to ``stopgrad(z * d_k)``). The released
            form's gradient has norm exactly 1 / N per view whatever the input; at the paper's
            sizes (d = 512, K = 10, batch 128) the paper form's is about 64 times larger, and at
            the paper's weight gamma = 1 it drives each client's embeddings into its own few
            dimensions (docs/methods.md).
        dsr_alpha: Scaling factor alpha on a client's own dimensions.
        dsr_keying: ``client_id`` (each client keeps its set for the whole run) or ``position``
            (the set of the client's position in the round's sample, as the released code does;
            the sample then comes in a random order each round, drawn from the run seed, so a
            client gets a different set each round and only the first sets are used).
        dsr_dims: Dimensions per client m (0 = floor(d / K)); the released runs used both 10 and
            51 at K = 10. Needs m * K <= d, as the sets are disjoint.
        pd: Use projector distillation.
        pd_weight: Weight delta of PD.
        pd_form: ``kl`` (KL(softmax(z_raw/T) || softmax(h/T)), the paper's) or ``mse``.
        pd_temperature: Softmax temperature T of the KL form.
    """

    dsr: bool = True
    dsr_weight: float = 1.0
    dsr_form: Literal["paper", "released"] = "released"
    dsr_alpha: float = 10.0
    dsr_keying: Literal["client_id", "position"] = "client_id"
    dsr_dims: int = 0
    pd: bool = True
    pd_weight: float = 0.1
    pd_form: Literal["kl", "mse"] = "kl"
    pd_temperature: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.dsr_weight >= 0, "method.dsr_weight must be >= 0")
        require(self.dsr_alpha > 0, "method.dsr_alpha must be > 0")
        require(self.dsr_dims >= 0, "method.dsr_dims must be >= 0 (0 = floor(d / K))")
        require(self.pd_weight >= 0, "method.pd_weight must be >= 0")
        require(self.pd_temperature > 0, "method.pd_temperature must be > 0")


@dataclasses.dataclass(frozen=True)
class ScalingSets:
    """The clients' DSR directions, drawn once before round 0.

    Attributes:
        dims: ``(num_clients, m)`` disjoint dimension indices per client, m = floor(d / K).
        basis: ``(d, d)`` orthonormal basis Q shared by all clients (used by the released form).
    """

    dims: torch.Tensor
    basis: torch.Tensor

    def scale(self, index: int, alpha: float) -> torch.Tensor:
        """``(d,)`` scaling vector of set ``index``: alpha on its dimensions, 1 elsewhere."""
        vector = torch.ones(self.basis.shape[0], dtype=self.basis.dtype)
        vector[self.dims[index]] = alpha
        return vector


def draw_scaling_sets(
    *, embed_dim: int, num_clients: int, seed: int, dims_per_client: int = 0
) -> ScalingSets:
    """Disjoint per-client dimension sets from one random permutation, and a random basis.

    Args:
        embed_dim: The embedding width d.
        num_clients: Number of clients K.
        seed: The run seed.
        dims_per_client: Dimensions per set m; 0 = floor(d / K).

    Raises:
        ConfigError: There are more clients than embedding dimensions, or m * K > d.
    """
    m = dims_per_client or embed_dim // num_clients
    if m < 1:
        raise ConfigError(
            f"SSD needs at least one embedding dimension per client, but the embedding has "
            f"{embed_dim} dimensions for {num_clients} clients; raise model.projector_out."
        )
    if m * num_clients > embed_dim:
        raise ConfigError(
            f"method.dsr_dims = {m} gives {num_clients} disjoint sets of {m * num_clients} "
            f"dimensions in all, more than the embedding's {embed_dim}; use at most "
            f"{embed_dim // num_clients}."
        )
    rng = numpy_rng(seed, SCALING_SETS)
    perm = rng.permutation(embed_dim)
    dims = torch.from_numpy(perm[: m * num_clients].reshape(num_clients, m).copy())
    gaussian = torch.from_numpy(rng.standard_normal((embed_dim, embed_dim)))
    basis, _ = torch.linalg.qr(gaussian)
    return ScalingSets(dims=dims, basis=basis.float())


class SSD:
    """Soft separation (DSR) and projector distillation (PD) on top of FedAlignUniform; FedAvg
    on the server (SSD adds no server-side step)."""

    def __init__(self, options: SSDOptions, context: MethodContext) -> None:
        if options.pd and context.feature_dim != context.embed_dim:
            raise ConfigError(
                f"projector distillation needs the projector output ({context.embed_dim}) as wide "
                f"as the encoder output ({context.feature_dim}); set model.projector_out = 0 "
                "or method.pd = false."
            )
        self.options = options
        # Position keying uses the released code's random order of each round's sample.
        self.random_sample_order = options.dsr and options.dsr_keying == "position"
        # Drawn only when DSR is on, so that the +PD ablation runs with any number of clients.
        self.sets = (
            draw_scaling_sets(
                embed_dim=context.embed_dim,
                num_clients=context.num_clients,
                seed=context.seed,
                dims_per_client=options.dsr_dims,
            )
            if options.dsr
            else None
        )
        if self.sets is not None:
            self._basis = self.sets.basis.to(context.device)
            self._scales = torch.stack(
                [self.sets.scale(k, options.dsr_alpha) for k in range(context.num_clients)]
            ).to(context.device)

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
            return self._loss(out, client_id=client_id, position=position)

    def _loss(
        self, out: ViewOutputs, *, client_id: int, position: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        opts = self.options
        loss, parts = align_uniform_loss(
            out, uniformity_weight=opts.uniformity_weight, t=opts.uniformity_t
        )
        if opts.dsr:
            scale = self._scales[client_id if opts.dsr_keying == "client_id" else position]
            # Both views in one call (a stack), each view's term as in the paper, then their mean.
            z = torch.stack(out.z)
            dsr = (
                losses.dsr_paper(z, scale)
                if opts.dsr_form == "paper"
                else losses.dsr_released(z, self._basis, scale)
            ).mean()
            loss = loss + opts.dsr_weight * dsr
            parts["dsr"] = dsr.detach()
        if opts.pd:
            h, z_raw = torch.stack(out.h), torch.stack(out.z_raw)
            pd = (
                losses.projector_distillation_kl(h, z_raw, opts.pd_temperature)
                if opts.pd_form == "kl"
                else losses.projector_distillation_mse(h, z_raw)
            ).mean()
            loss = loss + opts.pd_weight * pd
            parts["pd"] = pd.detach()
        return loss, parts

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The scaling sets (when DSR is on), saved so that a run can be inspected or resumed."""
        return sets_state(self.sets, "dsr")

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Check that saved scaling sets are the ones this run draws from its seed.

        Raises:
            ConfigError: The saved sets differ (the checkpoint belongs to another run).
        """
        check_saved_sets(self.sets, state, prefix="dsr", what="SSD scaling sets")


def sets_state(sets: ScalingSets | None, prefix: str) -> dict[str, torch.Tensor]:
    """Copies of the sets under ``<prefix>_dims`` and ``<prefix>_basis`` (empty without sets)."""
    if sets is None:
        return {}
    return {f"{prefix}_dims": sets.dims.clone(), f"{prefix}_basis": sets.basis.clone()}


def check_saved_sets(
    sets: ScalingSets | None, saved: Mapping[str, torch.Tensor], *, prefix: str, what: str
) -> None:
    """Check that ``saved`` holds exactly the sets this run drew (:func:`sets_state`).

    SSD and HSD redraw their sets from the run seed, so a resumed run only compares them.

    Raises:
        ConfigError: The saved sets differ (the checkpoint belongs to another run), naming
            ``what`` was compared.
    """
    require_same_state(
        sets_state(sets, prefix),
        saved,
        f"the checkpoint's {what} differ from this run's (another seed, number of clients or "
        "embedding size); resume only the run that wrote it.",
    )
