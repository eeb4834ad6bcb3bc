"""FedX as an add-on to FedAlignUniform (Han et al., ECCV 2022, arXiv:2207.09158).

Han, Park, Wu, Kim, Wu, Cha, "FedX: Unsupervised Federated Learning with Cross Knowledge
Distillation", ECCV 2022, arXiv:2207.09158.

Two-sided knowledge distillation. Locally, the two views must agree on how they relate to a batch
of other local images (relational loss). Globally, the frozen global model received this round is
a teacher: a prediction head q on the local embedding must pick out the teacher's embedding of the
other view among negatives (contrastive) and reproduce the teacher's relations to the random batch
(relational). As an add-on, the base objective takes the place of FedX's local contrastive term:
``L = L_AU + L_rel^local + L_con^global + L_rel^global`` (docs/methods.md, ``fedx``). The head q is
part of the global model (aggregated with FedAvg); the teacher is one frozen module kept inside the
method and loaded from the global weights at the start of every client's round.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedssd import losses
from fedssd.losses import nt_xent as nt_xent  # re-exported: FedX's NT-Xent is SimCLR's
from fedssd.methods.protocol import ClientState, MethodContext, require
from fedssd.methods.views import (
    AlignUniformOptions,
    ViewOutputs,
    align_uniform_loss,
    full_precision,
)

HEAD = "fedx_q"
"""Name of the prediction head q among the model's extras."""


@dataclasses.dataclass(frozen=True)
class FedXOptions(AlignUniformOptions):
    """Options of FedX on FedAlignUniform (defaults: the released ``main.py``;
    docs/methods.md, ``fedx``).

    Attributes:
        uniformity_weight: Weight beta of the uniformity term of the base objective (inherited).
        uniformity_t: Temperature t of the uniformity term (inherited).
        temperature: tau of the NT-Xent terms and the student side of both relational terms.
        local_target_temperature: Target-mixture temperature of the local relational loss.
        global_target_temperature: Target-mixture temperature of the global relational loss.
        keep_local_ntxent: Also add FedX's local NT-Xent term (off: L_AU takes its place) [I].
        separate_bn_pass: Run the two views and the random batch through the model separately
            (BatchNorm statistics per part) instead of in one concatenated pass (FedX) [I].
        detach_targets: Stop gradients through the relational target mixture and the local
            random-batch embeddings (the released code lets them flow) [I].
        random_batch: ``previous`` (the client's previous mini-batch, first view: other images
            of the same client) or ``current`` (the current batch's first view again) [I: the
            method sees one batch per step; FedX draws a second, independent pass].
    """

    temperature: float = 0.1
    local_target_temperature: float = 0.1
    global_target_temperature: float = 0.1
    keep_local_ntxent: bool = False
    separate_bn_pass: bool = False
    detach_targets: bool = False
    random_batch: Literal["previous", "current"] = "previous"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.temperature > 0, "method.temperature must be > 0")
        require(self.local_target_temperature > 0, "method.local_target_temperature must be > 0")
        require(self.global_target_temperature > 0, "method.global_target_temperature must be > 0")


def relational_loss(
    a: torch.Tensor,
    a_other: torch.Tensor,
    r: torch.Tensor,
    *,
    temperature: float,
    target_temperature: float,
    detach_target: bool = False,
) -> torch.Tensor:
    """FedX's relational loss of two views against a random set.

    ``P = softmax(cos(a, r) / tau)``, ``P' = softmax(cos(a', r) / tau)``,
    ``M = (softmax(cos(a, r) / tau_t) + softmax(cos(a', r) / tau_t)) / 2``;
    ``REL = 1/2 mean_i [KL(M_i || P_i) + KL(M_i || P'_i)]``. M is not detached by default
    (the released code lets gradients through it).

    Args:
        a: ``(n, d)`` first-view embeddings.
        a_other: ``(n, d)`` second-view embeddings.
        r: ``(m, d)`` embeddings of the random set.
        temperature: Student temperature tau.
        target_temperature: Target-mixture temperature tau_t.
        detach_target: Stop gradients through M.
    """
    r = losses.normalize(r)
    sim = losses.normalize(a) @ r.T
    sim_other = losses.normalize(a_other) @ r.T
    mixture = (
        F.softmax(sim / target_temperature, dim=1)
        + F.softmax(sim_other / target_temperature, dim=1)
    ) / 2
    if detach_target:
        mixture = mixture.detach()
    log_mixture = mixture.clamp_min(1e-30).log()

    def kl(log_student: torch.Tensor) -> torch.Tensor:
        return (mixture * (log_mixture - log_student)).sum(dim=1).mean()

    student = F.log_softmax(sim / temperature, dim=1)
    student_other = F.log_softmax(sim_other / temperature, dim=1)
    return (kl(student) + kl(student_other)) / 2


def prediction_head(dim: int) -> nn.Module:
    """FedX's head q: ``Linear(d, d) - ReLU - Linear(d, d)``, no BatchNorm."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


class FedX:
    """FedAlignUniform plus FedX's relational and cross (global) distillation terms; FedAvg on
    the server (encoder, projector and head q)."""

    local_modules: frozenset[str] = frozenset()

    def __init__(self, options: FedXOptions, context: MethodContext) -> None:
        self.options = options
        self.embed_dim = context.embed_dim
        self.teacher: nn.Module | None = None
        self._previous: torch.Tensor | None = None

    def extra_modules(self) -> dict[str, nn.Module]:
        """The prediction head q, aggregated like encoder and projector."""
        return {HEAD: prediction_head(self.embed_dim)}

    # -- client hooks

    def begin_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> None:
        """Load the received global weights into the (one, reused) frozen teacher."""
        if self.teacher is None:
            self.teacher = copy.deepcopy(model)
            self.teacher.requires_grad_(False)
        self.teacher.load_state_dict(model.state_dict())
        # Eval mode: the teacher's BatchNorm uses the aggregated running statistics.
        self.teacher.eval()
        self._previous = None

    def after_step(self, model: nn.Module) -> None:
        """Nothing per step."""

    def end_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> tuple[ClientState, dict[str, torch.Tensor]]:
        """Clients keep nothing: the teacher is always the freshly received global model."""
        self._previous = None
        return ClientState(), {}

    # -- loss

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
        if self.teacher is None:
            raise RuntimeError("FedX's teacher is loaded in begin_client; call it first.")
        opts = self.options
        head = model.get_submodule(f"extras.{HEAD}")
        n = view1.shape[0]
        random = view1 if self._previous is None else self._previous
        if opts.random_batch == "previous":
            self._previous = view1.detach()
        if opts.separate_bn_pass:
            parts_out = [model(x) for x in (view1, view2, random)]
            h1, h2 = parts_out[0][0].float(), parts_out[1][0].float()
            u1, u2, u_random = (p[1].float() for p in parts_out)
        else:
            # One pass over [x1; x2; R]: BatchNorm statistics over all 3B samples, as in FedX.
            h_all, u_all = model(torch.cat([view1, view2, random]))
            h1, h2 = h_all[:n].float(), h_all[n : 2 * n].float()
            u1, u2, u_random = u_all[:n].float(), u_all[n : 2 * n].float(), u_all[2 * n :].float()
        p1, p2 = head(u1).float(), head(u2).float()
        with torch.no_grad():
            _, teacher_out = self.teacher(torch.cat([view2, random]))
            teacher_out = teacher_out.float()
        teacher_view2, teacher_random = teacher_out[:n], teacher_out[n:]

        with full_precision(view1.device):
            out = ViewOutputs(
                h=(h1, h2), z_raw=(u1, u2), z=(losses.normalize(u1), losses.normalize(u2))
            )
            loss, parts = align_uniform_loss(
                out, uniformity_weight=opts.uniformity_weight, t=opts.uniformity_t
            )
            local_rel = relational_loss(
                u1,
                u2,
                u_random.detach() if opts.detach_targets else u_random,
                temperature=opts.temperature,
                target_temperature=opts.local_target_temperature,
                detach_target=opts.detach_targets,
            )
            global_con = nt_xent(p1, teacher_view2, opts.temperature)
            global_rel = relational_loss(
                p1,
                p2,
                teacher_random,
                temperature=opts.temperature,
                target_temperature=opts.global_target_temperature,
                detach_target=opts.detach_targets,
            )
            loss = loss + local_rel + global_con + global_rel
            parts.update(
                local_rel=local_rel.detach(),
                global_con=global_con.detach(),
                global_rel=global_rel.detach(),
            )
            if opts.keep_local_ntxent:
                local_con = nt_xent(u1, u2, opts.temperature)
                loss = loss + local_con
                parts["local_con"] = local_con.detach()
            return loss, parts
