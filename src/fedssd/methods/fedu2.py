"""FedU2 as an add-on to FedAlignUniform: FUR on the client, EUA on the server.

Liao et al., CVPR 2024, arXiv:2403.16398 (docs/methods.md, ``fedu2``).

Liao, Zhang, Liu, Wang, Zhang, "Rethinking the Representation in Federated Unsupervised Learning
with Non-IID Data", CVPR 2024, arXiv:2403.16398. The min-norm solver is that of Sener & Koltun,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018, arXiv:1810.04650; the FAMO
variant follows Liu et al., "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
arXiv:2306.03792.

- FUR (flexible uniform regulariser): the batch of unit embeddings is matched in distribution to as
  many uniform samples on the sphere, with a sliced Wasserstein distance computed in the tangent
  spaces (sphere log maps) of random base points. ``L = L_AU + 0.01 (FUR(z^(1)) + FUR(z^(2)))``.
- EUA (efficient unified aggregator): each client's deviation from the global model is one
  objective; the server steps along the min-norm convex combination of the unit deviations (MGDA,
  what the released code runs) or, behind a switch, a FAMO-weighted step whose logits are kept per
  client id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from fedssd import losses
from fedssd.aggregate import fedavg
from fedssd.methods.protocol import ClientState, ClientUpdate, MethodContext, require
from fedssd.methods.server import fedavg_updates
from fedssd.methods.views import (
    AlignUniformOptions,
    align_uniform_loss,
    forward_views,
    full_precision,
)
from fedssd.seeding import generator

State = Mapping[str, torch.Tensor]
# Purpose tag of FUR's random draws (reference sample, base points, projection directions).
FUR_DRAWS = 0xF02
# The cosine is kept off +-1 so that arccos and the tangent direction stay differentiable.
_COS_LIMIT = 1 - 1e-6
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclasses.dataclass(frozen=True)
class FedU2Options(AlignUniformOptions):
    """Options of FedU2 on FedAlignUniform (defaults: the released ``main.py``;
    docs/methods.md, ``fedu2``).

    Attributes:
        uniformity_weight: Weight beta of the uniformity term of the base objective (inherited).
        uniformity_t: Temperature t of the uniformity term (inherited).
        fur_weight: Weight of FUR per view (0.01 in SSD's runs).
        fur_projections: Random projection directions L per base point (6).
        fur_base_points: Number of tangent spaces; 0 means one per batch row, as the released
            code draws [I: it is configured with 6].
        fur_normaliser: The sum over base points is divided by this (6 in the code; with 128
            base points the effective weight is 128 / 6 times the nominal one) [I].
        fur_view_reduce: ``sum`` (code) or ``mean`` of the two views' terms [I].
        aggregator: ``mgda`` (EUA as the released server runs it), ``famo`` (the FAMO-style
            reconstruction, logits per client id) or ``fedavg`` (FUR only) [I].
        server_lr: MGDA's server step eta_s (8 in the released ``main.py``; sensitive) [I].
        sharpen_temperature: T_s of the data-size weights ``pi_k^(1/T_s)`` (1 = no sharpening).
        famo_server_lr: FAMO's server step (1/2 makes the step a convex combination) [I].
        famo_logit_lr: Step of FAMO's logit update.
        famo_decay: Weight decay gamma of FAMO's logits.
        two_client_rule: MGDA with exactly two accepted updates: ``released`` returns the data
            weights pi unchanged, as the released solver does for fewer than three objectives
            (the released ``min_norm_solvers.py``); ``exact`` uses the two-vector min-norm closed
            form [I].
    """

    fur_weight: float = 0.01
    fur_projections: int = 6
    fur_base_points: int = 0
    fur_normaliser: float = 6.0
    fur_view_reduce: Literal["sum", "mean"] = "sum"
    aggregator: Literal["mgda", "famo", "fedavg"] = "mgda"
    server_lr: float = 8.0
    sharpen_temperature: float = 1.0
    famo_server_lr: float = 0.5
    famo_logit_lr: float = 0.01
    famo_decay: float = 0.01
    two_client_rule: Literal["released", "exact"] = "released"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.fur_weight >= 0, "method.fur_weight must be >= 0")
        require(self.fur_projections >= 1, "method.fur_projections must be >= 1")
        require(self.fur_base_points >= 0, "method.fur_base_points must be >= 0 (0 = batch)")
        require(self.fur_normaliser > 0, "method.fur_normaliser must be > 0")
        require(self.server_lr > 0, "method.server_lr must be > 0")
        require(self.sharpen_temperature > 0, "method.sharpen_temperature must be > 0")
        require(self.famo_server_lr > 0, "method.famo_server_lr must be > 0")
        require(self.famo_logit_lr >= 0, "method.famo_logit_lr must be >= 0")
        require(self.famo_decay >= 0, "method.famo_decay must be >= 0")
        require(
            self.two_client_rule in ("released", "exact"),
            "method.two_client_rule must be 'released' or 'exact'",
        )


# ---------------------------------------------------------------- FUR (client)


def _log_coefficients(base: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``c = clip(<b, y>)`` and the factor ``s`` with ``Log_b(y) = s (y - c b)``.

    ``s = arccos(c) / ||y - c b||`` (``||v||`` floored at 1e-12), or 1 where the angle is below
    1e-6 (geoopt's sphere convention). Shapes broadcast: ``base (..., d)``, ``y (..., d)``.
    """
    raw = (base * y).sum(dim=-1)
    c = raw.clamp(-_COS_LIMIT, _COS_LIMIT)
    # ||y - c b||^2 expanded, so that batched callers need no (bases, rows, d) tensor.
    sq_norm = (y * y).sum(dim=-1) - 2 * c * raw + c.pow(2) * (base * base).sum(dim=-1)
    norm = sq_norm.clamp_min(1e-24).sqrt()
    angle = torch.arccos(c)
    scale = torch.where(angle > 1e-6, angle / norm, torch.ones_like(angle))
    return c, scale


def sphere_log(base: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Log map of the unit sphere at ``base``: the tangent vector pointing at ``y``.

    ``Log_b(y) = arccos(c) (y - c b) / ||y - c b||`` with ``c = <b, y>`` clipped.

    Args:
        base: ``(..., d)`` unit base points.
        y: ``(..., d)`` unit points (broadcast against ``base``).

    Returns:
        ``(..., d)`` tangent vectors at ``base``, of length the geodesic distance.
    """
    c, scale = _log_coefficients(base, y)
    return scale.unsqueeze(-1) * (y - c.unsqueeze(-1) * base)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Squared sliced Wasserstein-2 distance of two equal-size samples along given directions.

    ``(1 / (L N)) sum_l sum_i (sort_i <x, theta_l> - sort_i <y, theta_l>)^2``.

    Args:
        x: ``(n, d)`` first sample.
        y: ``(n, d)`` second sample.
        directions: ``(d, L)`` projection directions (not normalised, as released).
    """
    px = torch.sort(x @ directions, dim=0).values
    py = torch.sort(y @ directions, dim=0).values
    return (px - py).pow(2).mean()


def _projected_logs(bases: torch.Tensor, y: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """``<Log_{b_m}(y_i), theta_{m,l}>`` for all base points, rows and directions.

    Args:
        bases: ``(m, d)`` unit base points.
        y: ``(n, d)`` unit points.
        directions: ``(m, d, L)`` directions per base point.

    Returns:
        ``(m, n, L)`` projections (the tangent vectors themselves are never materialised).
    """
    c, scale = _log_coefficients(bases[:, None, :], y[None, :, :])
    y_proj = torch.einsum("nd,mdl->mnl", y, directions)
    b_proj = torch.einsum("md,mdl->ml", bases, directions)
    return scale.unsqueeze(-1) * (y_proj - c.unsqueeze(-1) * b_proj[:, None, :])


def flexible_uniform_regularizer(
    z: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    projections: int = 6,
    base_points: int = 0,
    normaliser: float = 6.0,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """FedU2's FUR: sliced Wasserstein to uniform samples, in tangent spaces of the sphere.

    ``FUR(Z) = (1 / normaliser) sum_m SW(Log_{b_m}(U), Log_{b_m}(Z); theta_m)`` with U as many
    uniform samples as rows of Z (drawn once per call), random unit base points b_m and, per base
    point, ``projections`` Gaussian directions theta_m (the released ``sw_loss.py``).

    Args:
        z: ``(n, d)`` unit-norm embeddings; the gradient flows through the log maps.
        generator: Random stream of the draws (on ``z``'s device).
        projections: Directions L per base point.
        base_points: Number of base points; 0 means n (the released code).
        normaliser: Divisor of the sum over base points (6 in the released code).
        reference: ``(n, d)`` a given reference sample instead of a uniform draw (tests).

    Returns:
        A scalar tensor.
    """
    n, d = z.shape
    options = {"generator": generator, "device": z.device, "dtype": z.dtype}
    if reference is None:
        reference = losses.normalize(torch.randn(n, d, **options))  # type: ignore[arg-type]
    count = base_points or n
    bases = losses.normalize(torch.randn(count, d, **options))  # type: ignore[arg-type]
    directions = torch.randn(count, d, projections, **options)  # type: ignore[arg-type]
    px = torch.sort(_projected_logs(bases, reference, directions), dim=1).values
    py = torch.sort(_projected_logs(bases, z, directions), dim=1).values
    per_base = (px - py).pow(2).mean(dim=(1, 2))
    return per_base.sum() / normaliser


# ---------------------------------------------------------------- EUA (server)


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of ``(k,)`` ``v`` onto the probability simplex."""
    u = torch.sort(v, descending=True).values
    cumulative = u.cumsum(0) - 1
    ranks = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - cumulative / ranks > 0).max())
    shift = cumulative[rho] / (rho + 1)
    return (v - shift).clamp_min(0)


def min_norm_weights(
    gram: torch.Tensor,
    init: torch.Tensor,
    *,
    max_iter: int = 250,
    tol: float = 1e-5,
    two_client_rule: Literal["released", "exact"] = "exact",
) -> torch.Tensor:
    """``argmin_{c in simplex} ||sum_k c_k v_k||^2`` from the Gram matrix of the v_k (MGDA).

    Two vectors: with ``two_client_rule="exact"`` the closed form
    ``c_1 = clip(<v_2 - v_1, v_2> / ||v_1 - v_2||^2, 0, 1)``; with ``"released"`` ``init``
    unchanged, as the released solver returns its starting point for fewer than three vectors
    (the released ``min_norm_solvers.py``). More: projected gradient steps (step 1 / largest
    eigenvalue) from ``init``, each followed by an exact line search on the segment, until the L1
    change is below ``tol`` (Sener & Koltun's solver without its unbounded loop).

    Args:
        gram: ``(k, k)`` Gram matrix ``<v_i, v_j>`` (float64 recommended).
        init: ``(k,)`` starting point on the simplex (the data weights).
        max_iter: Iteration cap.
        tol: Stop when ``||c_new - c||_1 < tol``.
        two_client_rule: What two vectors get (see above); the function's own default is the
            true minimiser, :class:`FedU2Options` defaults to the released behaviour.

    Returns:
        ``(k,)`` weights on the simplex.
    """
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=gram.dtype)
    if k == 2:
        if two_client_rule == "released":
            return init.to(gram.dtype).clone()
        denominator = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        if denominator <= 1e-12:
            return init.to(gram.dtype).clone()  # v_1 = v_2: every combination has the same norm
        first = ((gram[1, 1] - gram[0, 1]) / denominator).clamp(0, 1)
        return torch.stack([first, 1 - first])
    c = init.to(gram.dtype).clone()
    largest = float(torch.linalg.eigvalsh(gram).max())
    if largest <= 0:
        return c
    for _ in range(max_iter):
        target = project_to_simplex(c - gram @ c / largest)
        aa, ab, bb = c @ gram @ c, c @ gram @ target, target @ gram @ target
        curvature = aa + bb - 2 * ab
        step = 1.0 if curvature <= 1e-15 else float(((aa - ab) / curvature).clamp(0, 1))
        new = c + step * (target - c)
        change = float((new - c).abs().sum())
        c = new
        if change < tol:
            break
    return c


def sharpened_weights(weights: Sequence[float], temperature: float) -> torch.Tensor:
    """``pi_k^(1/T) / sum_j pi_j^(1/T)`` of the normalised data weights, ``(k,)`` float64."""
    pi = torch.tensor(weights, dtype=torch.float64)
    pi = pi / pi.sum()
    powered = pi.pow(1.0 / temperature)
    return powered / powered.sum()


def is_parameter_key(key: str, tensor: torch.Tensor) -> bool:
    """Whether a state entry is a trainable parameter (not a BatchNorm buffer) by its name."""
    return tensor.is_floating_point() and not key.endswith(_BUFFER_SUFFIXES)


def _split(reference: State, parameter_keys: Collection[str]) -> tuple[list[str], list[str]]:
    params = [k for k in reference if k in parameter_keys]
    return params, [k for k in reference if k not in parameter_keys]


def eua_mgda(
    reference: State,
    states: Sequence[State],
    pi: torch.Tensor,
    *,
    server_lr: float,
    parameter_keys: Collection[str],
    two_client_rule: Literal["released", "exact"] = "released",
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """EUA as the released server runs it: one step along the min-norm combination.

    ``d_k = theta_g - theta_k``, ``v_k = 2 d_k / ||d_k||`` (over all parameters together; a client
    that did not move gets v_k = 0), ``c = min_norm_weights(Gram(v), pi)``,
    ``theta_g <- theta_g - server_lr sum_k c_k v_k``. Buffers: ``sum_k pi_k buffer_k``.

    Args:
        reference: The global state theta_g the round started from.
        states: The clients' states.
        pi: ``(k,)`` the (sharpened) data weights, summing to 1.
        server_lr: eta_s.
        parameter_keys: Entries that are parameters (the rest are averaged).
        two_client_rule: Two clients: ``released`` keeps c = pi (the released solver),
            ``exact`` solves the min-norm problem (see :func:`min_norm_weights`).

    Returns:
        The new state and the weights c.
    """
    params, buffers = _split(reference, parameter_keys)
    k = len(states)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for key in params:
        deviations = torch.stack([(reference[key] - s[key]).flatten().float() for s in states])
        gram += (deviations @ deviations.T).double().cpu()
    norms = gram.diagonal().sqrt()
    scales = torch.where(norms > 0, 2.0 / norms.clamp_min(1e-300), torch.zeros_like(norms))
    weights = min_norm_weights(
        gram * scales[:, None] * scales[None, :], pi, two_client_rule=two_client_rule
    )
    coefficients = (weights * scales).tolist()
    result = _average(reference, states, pi, buffers)
    for key in params:
        step = torch.zeros_like(reference[key], dtype=torch.float32)
        for state, coefficient in zip(states, coefficients, strict=True):
            step.add_((reference[key] - state[key]).float(), alpha=coefficient)
        result[key] = (reference[key].float() - server_lr * step).to(reference[key].dtype)
    return result, weights


def eua_famo(
    reference: State,
    states: Sequence[State],
    pi: torch.Tensor,
    logits: torch.Tensor,
    *,
    server_lr: float,
    logit_lr: float,
    decay: float,
    parameter_keys: Collection[str],
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The FAMO-style EUA reconstruction (FAMO, Liu et al., NeurIPS 2023, as
    the released repository's unused variant, in a clean form) [I].

    Objectives ``l_k(theta) = ||theta - theta_k||^2``; ``zeta = softmax(xi)``;
    ``w_k = (zeta_k / l_k) / sum_j (zeta_j / l_j)``;
    ``theta_new = theta - 2 server_lr sum_k w_k (theta - theta_k)``; then with
    ``delta_k = log l_k(theta) - log l_k(theta_new)``,
    ``xi <- xi - logit_lr ((d zeta / d xi)^T delta + decay xi)``. Buffers: ``sum_k pi_k b_k``.

    Args:
        reference: The global state theta the round started from.
        states: The clients' states.
        pi: ``(k,)`` data weights (for the buffers).
        logits: ``(k,)`` the participating clients' logits xi.
        server_lr: The server step.
        logit_lr: The logit step.
        decay: Weight decay of the logits.
        parameter_keys: Entries that are parameters.

    Returns:
        The new state, the new logits ``(k,)`` and the weights w ``(k,)``.
    """
    params, buffers = _split(reference, parameter_keys)

    def distances(theta: State) -> torch.Tensor:
        total = torch.zeros(len(states), dtype=torch.float64)
        for key in params:
            for i, state in enumerate(states):
                total[i] += float((theta[key].double() - state[key].double()).pow(2).sum())
        return total

    before = distances(reference) + 1e-8
    zeta = torch.softmax(logits.double(), dim=0)
    weights = (zeta / before) / (zeta / before).sum()
    result = _average(reference, states, pi, buffers)
    for key in params:
        pull = torch.zeros_like(reference[key], dtype=torch.float32)
        for state, weight in zip(states, weights.tolist(), strict=True):
            pull.add_((reference[key] - state[key]).float(), alpha=weight)
        result[key] = (reference[key].float() - 2 * server_lr * pull).to(reference[key].dtype)
    after = distances(result) + 1e-8
    delta = before.log() - after.log()
    gradient = zeta * (delta - (zeta * delta).sum())
    new_logits = logits.double() - logit_lr * (gradient + decay * logits.double())
    return result, new_logits.to(logits.dtype), weights


def _average(
    reference: State, states: Sequence[State], pi: torch.Tensor, keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    if not keys:
        return {}
    return fedavg([{k: s[k] for k in keys} for s in states], pi.tolist())


# ---------------------------------------------------------------- the method


class FedU2:
    """FedAlignUniform + FUR on the client; EUA (MGDA by default) on the server."""

    local_modules: frozenset[str] = frozenset()

    def __init__(self, options: FedU2Options, context: MethodContext) -> None:
        self.options = options
        self._seed = context.seed
        self._generator: torch.Generator | None = None
        self._parameter_keys: frozenset[str] | None = None
        # FAMO's logits, one per client id (never per position in the sample).
        self._logits = torch.zeros(context.num_clients, dtype=torch.float64)

    # -- client side

    def begin_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> None:
        """Seed FUR's draws from (seed, round, client) and note which entries are parameters."""
        device = next(model.parameters()).device
        self._generator = generator(self._seed, FUR_DRAWS, round_index, client_id, device=device)
        self._parameter_keys = frozenset(name for name, _ in model.named_parameters())

    def after_step(self, model: nn.Module) -> None:
        """Nothing per step."""

    def end_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> tuple[ClientState, dict[str, torch.Tensor]]:
        """Clients keep nothing (FUR is stateless)."""
        return ClientState(), {}

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
        if self._generator is None or self._generator.device != view1.device:
            # Called outside the round loop (no begin_client): a stream from the seed alone.
            self._generator = generator(self._seed, FUR_DRAWS, device=view1.device)
        out = forward_views(model, view1, view2)
        with full_precision(view1.device):
            loss, parts = align_uniform_loss(
                out, uniformity_weight=opts.uniformity_weight, t=opts.uniformity_t
            )
            terms = [
                flexible_uniform_regularizer(
                    z,
                    generator=self._generator,
                    projections=opts.fur_projections,
                    base_points=opts.fur_base_points,
                    normaliser=opts.fur_normaliser,
                )
                for z in out.z
            ]
            fur = terms[0] + terms[1]
            if opts.fur_view_reduce == "mean":
                fur = fur / 2
            parts["fur"] = fur.detach()
            return loss + opts.fur_weight * fur, parts

    # -- server side

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
    ) -> dict[str, torch.Tensor]:
        """EUA (MGDA or FAMO) on the parameters, weighted averages of the buffers."""
        opts = self.options
        states = [u.state for u in updates]
        if opts.aggregator == "fedavg":
            return fedavg_updates(global_state, updates)
        reference = {k: global_state[k] for k in states[0]}
        keys = self._parameter_keys
        if keys is None:
            keys = frozenset(k for k, v in reference.items() if is_parameter_key(k, v))
        pi = sharpened_weights([u.weight for u in updates], opts.sharpen_temperature)
        if opts.aggregator == "mgda":
            result, _ = eua_mgda(
                reference,
                states,
                pi,
                server_lr=opts.server_lr,
                parameter_keys=keys,
                two_client_rule=opts.two_client_rule,
            )
        else:
            ids = torch.tensor([u.client_id for u in updates])
            result, new_logits, _ = eua_famo(
                reference,
                states,
                pi,
                self._logits[ids],
                server_lr=opts.famo_server_lr,
                logit_lr=opts.famo_logit_lr,
                decay=opts.famo_decay,
                parameter_keys=keys,
            )
            self._logits[ids] = new_logits
        return {k: result.get(k, v) for k, v in global_state.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """FAMO's per-client logits (FAMO variant only)."""
        return {"famo_logits": self._logits.clone()} if self.options.aggregator == "famo" else {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore FAMO's logits."""
        if "famo_logits" in state:
            self._logits = state["famo_logits"].detach().double().cpu().clone()


__all__ = [
    "FUR_DRAWS",
    "FedU2",
    "FedU2Options",
    "eua_famo",
    "eua_mgda",
    "flexible_uniform_regularizer",
    "min_norm_weights",
    "project_to_simplex",
    "sharpened_weights",
    "sliced_wasserstein",
    "sphere_log",
]
