"""Loss terms as pure functions of tensors (Fang et al., ICCV 2025; docs/methods.md).

Shapes: ``z`` and ``z_raw`` are ``(batch, embed_dim)``; ``h`` is ``(batch, feature_dim)``. Functions
that take ``z`` expect unit-norm rows (see :func:`normalize`). The SSD terms also take a stack of
views, ``(views, batch, dim)``, and then return one value per view: computing both views in one
call halves the number of small operations, which dominate these terms' cost on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows projected onto the unit sphere."""
    return F.normalize(x, dim=-1)


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Alignment loss of two views (Wang & Isola 2020, alpha = 2): ``mean_i ||z1_i - z2_i||^2``.

    Args:
        z1: ``(batch, dim)`` unit-norm embeddings of the first view.
        z2: ``(batch, dim)`` unit-norm embeddings of the second view.
    """
    return (z1 - z2).pow(2).sum(dim=1).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Uniformity loss ``log mean_{i<j} exp(-t ||z_i - z_j||^2)`` over all pairs of the batch.

    A value <= 0 that is minimised; identical points give 0. Computed with a log-sum-exp so that
    well-spread batches do not underflow.

    Args:
        z: ``(batch, dim)`` unit-norm embeddings, batch >= 2, or a stack ``(views, batch, dim)``.
        t: The temperature (2 in the paper).

    Returns:
        A scalar, or one value per view for a stack.
    """
    n = z.shape[-2]
    # Squared distances from one matrix product: torch.pdist's backward is many times slower.
    sq_norm = z.pow(2).sum(dim=-1)
    sq_dist = sq_norm[..., :, None] + sq_norm[..., None, :] - 2 * z @ z.transpose(-2, -1)
    sq_dist = sq_dist.clamp_min(0)
    # The pairs i < j, by masking the rest to -inf (exp(-inf) = 0): a boolean index would cost a
    # nonzero() forward and a scatter backward, several times the rest of the loss on a CPU.
    outside = torch.ones(n, n, dtype=torch.bool, device=z.device).tril_()
    logits = (-t * sq_dist).masked_fill(outside, float("-inf"))
    return torch.logsumexp(logits.flatten(-2), dim=-1) - math.log(n * (n - 1) / 2)


def dsr_paper(z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DSR as the paper writes it: ``mean_i ||z_i - stopgrad(z_i * d_k)||^2``.

    Args:
        z: ``(batch, dim)`` unit-norm embeddings, or a stack ``(views, batch, dim)``.
        scale: ``(dim,)`` the client's scaling vector d_k (alpha on its dimensions, 1 elsewhere).

    Returns:
        A scalar, or one value per view for a stack.
    """
    target = (z * scale).detach()
    return (z - target).pow(2).sum(dim=-1).mean(dim=-1)


def dsr_released(z: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DSR as the authors' released code computes it (docs/methods.md, "The two DSR forms").

    The target scales the client's directions in a rotated basis and is put back on the sphere:
    ``P = normalize(stopgrad(z Q diag(scale) Q^T))``, and the penalty is the Frobenius norm of the
    whole batch difference divided by the batch size, ``||Z - P||_F / N`` (not a mean of squares).
    With ``S = Q diag(sqrt(scale))`` this is the released ``z S S^T``.

    Args:
        z: ``(batch, dim)`` unit-norm embeddings, or a stack ``(views, batch, dim)``.
        basis: ``(dim, dim)`` orthonormal basis Q shared by all clients.
        scale: ``(dim,)`` the client's scaling vector (alpha on its columns of Q, 1 elsewhere).

    Returns:
        A scalar, or one value per view for a stack.
    """
    target = normalize(((z @ basis) * scale) @ basis.T).detach()
    return (z - target).pow(2).sum(dim=(-2, -1)).sqrt() / z.shape[-2]


def projector_distillation_kl(
    h: torch.Tensor, z_raw: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Projector distillation ``KL(softmax(z_raw / T) || softmax(h / T))``, batch mean.

    Softmax is over the feature dimension of the raw (un-normalised) vectors. No stop-gradient:
    as in the released code, gradients reach both the encoder and the projector (docs/methods.md,
    ``ssd``).

    Args:
        h: ``(batch, dim)`` raw encoder output, or a stack ``(views, batch, dim)``.
        z_raw: ``(batch, dim)`` raw projector output (same shape as ``h``).
        temperature: Softmax temperature T (0.5 in the paper).

    Returns:
        A scalar, or one value per view for a stack.
    """
    log_p = F.log_softmax(z_raw / temperature, dim=-1)
    log_q = F.log_softmax(h / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(dim=-1)


def projector_distillation_mse(h: torch.Tensor, z_raw: torch.Tensor) -> torch.Tensor:
    """The MSE variant of projector distillation: ``mean((h - z_raw)^2)``, one value per view for
    a stack ``(views, batch, dim)``."""
    return (h - z_raw).pow(2).mean(dim=(-2, -1))


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (SimCLR, Chen et al., ICML 2020) of N positive pairs ``(a_i, b_i)``.

    The rows of ``V = [a; b]`` are normalised inside; with ``s_ij = V_i . V_j / tau`` each of the
    2N rows has the loss ``-s_{i,pi(i)} + log sum_{k != i} exp(s_ik)``, whose denominator leaves
    out only the self-similarity (the positive stays in). The result is the mean over the 2N rows.

    Args:
        a: ``(n, dim)`` embeddings of the first view (any norm).
        b: ``(n, dim)`` embeddings of the second view (any norm).
        temperature: The temperature tau.
    """
    n = a.shape[0]
    v = normalize(torch.cat([a, b], dim=0))
    sim = v @ v.T / temperature
    # -inf on the diagonal drops exp(s_ii) from the log-sum-exp (zeroing it would keep exp(0) = 1).
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=v.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(v.device)
    return F.cross_entropy(sim, positives)


def byol_regression(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss ``mean_i (2 - 2 cos(p_i, stopgrad(target_i)))``.

    Equals the mean squared distance of the normalised vectors. No gradient reaches ``target``.

    Args:
        p: ``(batch, dim)`` online predictions.
        target: ``(batch, dim)`` target projections of the other view.
    """
    cos = F.cosine_similarity(p, target.detach(), dim=1)
    return (2 - 2 * cos).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's ``D(p, z) = -mean_i cos(p_i, stopgrad(z_i))``; no gradient reaches ``z``.

    Args:
        p: ``(batch, dim)`` predictions of one view.
        z: ``(batch, dim)`` projections of the other view.
    """
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()
