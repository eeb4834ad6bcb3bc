"""Orchestra: unsupervised federated learning via globally consistent clustering.

Lubana, Tang, Kawsar, Dick, Mathur, "Orchestra: Unsupervised Federated Learning via Globally
Consistent Clustering", ICML 2022, arXiv:2205.11506 (docs/methods.md, ``orchestra``).

Each client clusters its recent target projections into a few equal-size local centroids
(Sinkhorn-Knopp balanced assignments); the server FedAvgs the weights and clusters all received
local centroids into the global centroids; clients train the online network to predict, from one
view, the global-cluster assignment that an EMA target network gives the other view, plus a
rotation-prediction term that rules out degenerate solutions.

What lives where (the released code's ``models.py``; docs/methods.md, "Per-client state"):

- ``extras.centroids``: the global centroids ``(global_centroids, embed_dim)``, a buffer. Listed in
  ``local_modules`` so that clients do not upload them (they never change them); the server's
  :meth:`Orchestra.aggregate` sets them from its clustering and they reach the clients with the
  global weights.
- ``extras.rotation_head``: the degeneracy head ``Linear(embed_dim, 4)``, trained and FedAvg'd.
- The EMA target (encoder + projector): one reusable module inside the method, never a model
  parameter (SGD never sees it). ``target_mode="global"`` (default, the released code's
  ``myfedavg.py``): clients keep nothing; each client starts from the global target, sends its
  target beside the weights (payload ``target.*``), and the server FedAvgs the targets with the
  weights' FedAvg weights into the global target, kept in the method's server state (checkpointed;
  the Flower server sends it to the clients with the method state). ``target_mode="client"`` (the
  spec's "stateful client" option [I]): each client's target is kept in its
  :class:`~fedssd.methods.protocol.ClientState`. Either way, while there is no target yet (the
  first round, or a client's first participation) it starts as a copy of the received global
  online network, as the released code copies the online network at build time.
- The projection memory: a per-round FIFO inside the method, filled during local training and
  clustered in :meth:`Orchestra.end_client`; the local centroids travel as the update's payload.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedssd import losses
from fedssd.aggregate import fedavg
from fedssd.errors import ConfigError
from fedssd.methods.byol_common import TARGET_PREFIX as TARGET_PREFIX
from fedssd.methods.byol_common import TargetNetwork, strip_prefix, with_prefix
from fedssd.methods.byol_common import ema_update as ema_update
from fedssd.methods.protocol import ClientState, ClientUpdate, MethodContext, require
from fedssd.methods.server import fedavg_updates
from fedssd.methods.views import full_precision
from fedssd.seeding import generator

# Purpose tag of Orchestra's random streams ("ORCH"): extras initialisation and, per round and
# client, the rotation labels and the local clustering's initial centroids.
ORCHESTRA = 0x4F524348
_EXTRAS_KEY = 0
_CLIENT_KEY = 1

CENTROIDS = "centroids"
ROTATION_HEAD = "rotation_head"
CENTROIDS_KEY = f"extras.{CENTROIDS}.global_centroids"
PAYLOAD_KEY = "local_centroids"


@dataclasses.dataclass(frozen=True)
class OrchestraOptions:
    """Options of Orchestra (defaults: the released ``config.py`` and ``examples.sh``).

    Attributes:
        global_centroids: Number N_G of global centroids (128).
        local_centroids: Number N_L of local centroids per client (16).
        memory_size: Rows of each client's FIFO of target projections (128).
        temperature: Softmax temperature T of the assignments (0.1).
        target_momentum: EMA decay m of the target network (0.996).
        rotation_weight: Weight of the rotation-prediction (degeneracy) term (1).
        sinkhorn_sharpness: lambda of Sinkhorn-Knopp, ``P = softmax(lambda S)`` (25).
        sinkhorn_iterations: Most Sinkhorn-Knopp iterations in the server's clustering (100).
        sinkhorn_tolerance: Stop when the summed relative change of the sample scalings falls
            below this, checked every 10 iterations (1e-2).
        local_sinkhorn_iterations: Sinkhorn-Knopp iterations in the local clustering (10).
        local_clustering_iterations: Assignment/update iterations of the local clustering (5).
        server_steps: SGD steps of the server's clustering per round (500).
        server_lr: Its learning rate (0.01).
        server_momentum: Its momentum (0.9).
        server_weight_decay: Its weight decay (1e-4).
        init_round: Round 0 only fills the memory with target projections and clusters it (no
            weight changes), so that training starts from data-driven global centroids, as the
            released code's extra "round 0" does [C]; the configured rounds include it. False
            trains from round 0 against the random initial centroids.
        cap_global_centroids: Use ``min(global_centroids, num_clients * local_centroids)``
            global centroids [I]: with fewer local centroids in the whole federation than global
            ones, the surplus global centroids could never own a point.
        rotation_view: Which of the two augmented views is rotated for the degeneracy term [I]:
            the method sees two views per step where the released code draws a third; ``view1``
            (default) is the one the online network does not otherwise see (only the target
            does), so it is the closest stand-in for an independent view.
        target_mode: Where the EMA target lives between rounds. ``global`` (default, the
            released code): FedAvg'd on the server with the weights and sent back every round;
            clients keep no state. ``client`` [I]: kept per client id in the client store (the
            spec's optional "stateful client" mode).
    """

    global_centroids: int = 128
    local_centroids: int = 16
    memory_size: int = 128
    temperature: float = 0.1
    target_momentum: float = 0.996
    rotation_weight: float = 1.0
    sinkhorn_sharpness: float = 25.0
    sinkhorn_iterations: int = 100
    sinkhorn_tolerance: float = 1e-2
    local_sinkhorn_iterations: int = 10
    local_clustering_iterations: int = 5
    server_steps: int = 500
    server_lr: float = 0.01
    server_momentum: float = 0.9
    server_weight_decay: float = 1e-4
    init_round: bool = True
    cap_global_centroids: bool = True
    rotation_view: Literal["view1", "view2"] = "view1"
    target_mode: Literal["global", "client"] = "global"

    def __post_init__(self) -> None:
        require(self.global_centroids >= 1, "method.global_centroids must be >= 1")
        require(self.local_centroids >= 1, "method.local_centroids must be >= 1")
        require(
            self.memory_size >= self.local_centroids,
            "method.memory_size must be at least method.local_centroids",
        )
        require(self.temperature > 0, "method.temperature must be > 0")
        require(0 <= self.target_momentum <= 1, "method.target_momentum must be in [0, 1]")
        require(self.rotation_weight >= 0, "method.rotation_weight must be >= 0")
        require(self.sinkhorn_sharpness > 0, "method.sinkhorn_sharpness must be > 0")
        require(self.sinkhorn_iterations >= 1, "method.sinkhorn_iterations must be >= 1")
        require(self.sinkhorn_tolerance >= 0, "method.sinkhorn_tolerance must be >= 0")
        require(
            self.local_sinkhorn_iterations >= 1, "method.local_sinkhorn_iterations must be >= 1"
        )
        require(
            self.local_clustering_iterations >= 1,
            "method.local_clustering_iterations must be >= 1",
        )
        require(self.server_steps >= 0, "method.server_steps must be >= 0")
        require(self.server_lr > 0, "method.server_lr must be > 0")
        require(0 <= self.server_momentum < 1, "method.server_momentum must be in [0, 1)")
        require(self.server_weight_decay >= 0, "method.server_weight_decay must be >= 0")
        require(
            self.rotation_view in ("view1", "view2"),
            "method.rotation_view must be 'view1' or 'view2'",
        )
        require(
            self.target_mode in ("global", "client"),
            "method.target_mode must be 'global' or 'client'",
        )


# ---------------------------------------------------------------------------------------------
# Pure functions (the pieces the tests pin).


def sinkhorn_knopp(
    scores: torch.Tensor,
    *,
    sharpness: float = 25.0,
    max_iterations: int = 100,
    tolerance: float = 1e-2,
    check_every: int = 10,
) -> torch.Tensor:
    """Balanced soft assignments of ``n`` samples to ``k`` clusters (Sinkhorn-Knopp).

    ``P = softmax(sharpness * scores)`` row-wise, then alternately rescaled so that every cluster
    holds mass ``1/k`` and every sample ``1/n``; returned times ``n`` so that each row is a
    probability vector and each column sums to ``n / k`` (Lubana et al., ICML 2022). Stops early
    when the summed relative change of the sample scalings, checked every ``check_every``
    iterations, is below ``tolerance``. The last rescaling is the samples', so rows sum to 1
    exactly and columns to ``n / k`` up to the convergence reached.

    Args:
        scores: ``(n, k)`` similarities (cosines of unit vectors).
        sharpness: lambda; larger gives harder assignments.
        max_iterations: Most alternating rescalings.
        tolerance: Early-stop threshold.
        check_every: How often the threshold is checked.

    Returns:
        ``(n, k)`` assignments, float32 (computed in float64: the exponent reaches ``e^50``).
    """
    n, k = scores.shape
    kernel = torch.softmax(sharpness * scores.detach().double(), dim=1)  # (n, k)
    sample_scale = torch.ones(n, dtype=torch.float64, device=scores.device)
    cluster_scale = torch.ones(k, dtype=torch.float64, device=scores.device)
    for iteration in range(1, max_iterations + 1):
        # Cluster masses 1/k, then sample masses 1/n.
        cluster_scale = (1.0 / k) / (kernel.T @ sample_scale)
        new_sample_scale = (1.0 / n) / (kernel @ cluster_scale)
        if iteration % check_every == 0:
            change = (new_sample_scale / sample_scale - 1).abs().sum()
            sample_scale = new_sample_scale
            if float(change) < tolerance:
                break
        else:
            sample_scale = new_sample_scale
    plan = sample_scale[:, None] * kernel * cluster_scale[None, :]
    return (plan * n).float()


def cluster_assignment_loss(
    online: torch.Tensor, target: torch.Tensor, centroids: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Orchestra's clustering loss: the target's soft assignment predicted by the online view.

    ``-(1/B) sum_i sum_j q_ij log p_ij`` with ``q_i = softmax_j(target_i . c_j / T)`` (no
    gradient, plain softmax: the client targets are not Sinkhorn-balanced) and
    ``log p_i = log_softmax_j(online_i . c_j / T)``; one direction only (the released
    ``models.py``).

    Args:
        online: ``(batch, dim)`` unit-norm online projections of view 2.
        target: ``(batch, dim)`` unit-norm target projections of view 1.
        centroids: ``(clusters, dim)`` unit-norm global centroids (used detached).
        temperature: T.

    Returns:
        The scalar loss.
    """
    c = centroids.detach()
    q = torch.softmax(target.detach() @ c.T / temperature, dim=1)
    log_p = torch.log_softmax(online @ c.T / temperature, dim=1)
    return -(q * log_p).sum(dim=1).mean()


def rotate_quarter_turns(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Each image rotated by ``90 * turns[i]`` degrees (counter-clockwise).

    Args:
        images: ``(batch, channels, size, size)`` square images.
        turns: ``(batch,)`` int64 in ``{0, 1, 2, 3}``.

    Returns:
        ``(batch, channels, size, size)`` rotated images.

    Raises:
        ConfigError: The images are not square.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ConfigError(
            "Orchestra's rotation term needs square views; set the augmentation's crop size "
            "to a square."
        )
    rotations = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    return rotations[turns, torch.arange(images.shape[0], device=images.device)]


def local_clustering(
    memory: torch.Tensor,
    num_centroids: int,
    *,
    iterations: int = 5,
    sharpness: float = 25.0,
    sinkhorn_iterations: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Equal-size clustering of a client's memory into local centroids (Lubana et al., ICML 2022).

    Starts from distinct random memory rows; each iteration assigns every row to the argmax of
    its Sinkhorn-Knopp balanced assignment and moves each centroid to the normalised mean of its
    members (an empty cluster takes a random memory row). With fewer rows than ``num_centroids``,
    as many centroids as rows are returned [I] (a client with very little data).

    Args:
        memory: ``(n, dim)`` unit-norm target projections, ``n >= 1``.
        num_centroids: N_L.
        iterations: Assignment/update iterations.
        sharpness: Sinkhorn-Knopp lambda.
        sinkhorn_iterations: Sinkhorn-Knopp iterations (no early stop).
        generator: Source of the random initial rows, on ``memory``'s device.

    Returns:
        ``(min(num_centroids, n), dim)`` unit-norm centroids.
    """
    n = memory.shape[0]
    k = min(num_centroids, n)
    device = memory.device
    pick = torch.randperm(n, generator=generator, device=device)[:k]
    centroids = memory[pick].clone()
    for _ in range(iterations):
        soft = sinkhorn_knopp(
            memory @ centroids.T,
            sharpness=sharpness,
            max_iterations=sinkhorn_iterations,
            tolerance=0.0,
        )
        members = soft.argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, members, memory)
        counts = torch.bincount(members, minlength=k)
        # The normalised sum is the normalised mean: no division by the count needed.
        updated = losses.normalize(sums)
        empty = counts == 0
        if bool(empty.any()):
            fill = torch.randint(n, (int(empty.sum()),), generator=generator, device=device)
            updated[empty] = memory[fill]
        centroids = updated
    return centroids


def global_clustering(
    points: torch.Tensor,
    centroids: torch.Tensor,
    *,
    temperature: float = 0.1,
    steps: int = 500,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    sharpness: float = 25.0,
    sinkhorn_iterations: int = 100,
    sinkhorn_tolerance: float = 1e-2,
) -> torch.Tensor:
    """The server's clustering of the clients' local centroids (Lubana et al., ICML 2022;
    the released ``models.py``, ``global_clustering``).

    From the current global centroids ``C``, ``steps`` SGD steps (a fresh optimizer each call)
    on ``-(1/n) sum_i cos(Q_i, P_i)`` with ``Q = SK(Z C^T)`` (no gradient) and
    ``P_i = softmax(Z_i C^T / T)``, re-normalising the rows of ``C`` after every step.

    Args:
        points: ``(n, dim)`` local centroids of this round's clients.
        centroids: ``(clusters, dim)`` current global centroids.
        temperature: T of ``P``.
        steps: SGD steps.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        sharpness: Sinkhorn-Knopp lambda.
        sinkhorn_iterations: Most Sinkhorn-Knopp iterations.
        sinkhorn_tolerance: Its early-stop threshold.

    Returns:
        ``(clusters, dim)`` unit-norm new global centroids, float32, on ``centroids``' device.
    """
    z = losses.normalize(points.detach().float().to(centroids.device))
    c = losses.normalize(centroids.detach().float()).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([c], lr=lr, momentum=momentum, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            scores = z @ c.T
            q = sinkhorn_knopp(
                scores.detach(),
                sharpness=sharpness,
                max_iterations=sinkhorn_iterations,
                tolerance=sinkhorn_tolerance,
            )
            p = torch.softmax(scores / temperature, dim=1)
            loss = -F.cosine_similarity(q, p, dim=1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                c.copy_(losses.normalize(c))
    return c.detach()


# ---------------------------------------------------------------------------------------------
# Modules attached to the model.


class GlobalCentroids(nn.Module):
    """The global centroids as a buffer (no gradient; set by the server).

    Args:
        centroids: ``(clusters, dim)`` unit-norm initial centroids.
    """

    global_centroids: torch.Tensor

    def __init__(self, centroids: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("global_centroids", centroids.clone())


class _ProjectionMemory:
    """A FIFO of the latest ``size`` target projections (a ring buffer; order is irrelevant)."""

    def __init__(self, size: int, dim: int, device: torch.device) -> None:
        self.rows = torch.zeros(size, dim, device=device)
        self.filled = 0
        self._next = 0

    def push(self, z: torch.Tensor) -> None:
        size = self.rows.shape[0]
        z = z.detach().float()[-size:]
        at = (self._next + torch.arange(z.shape[0], device=z.device)) % size
        self.rows[at] = z
        self._next = (self._next + z.shape[0]) % size
        self.filled = min(self.filled + z.shape[0], size)

    @property
    def full(self) -> bool:
        return self.filled == self.rows.shape[0]

    def contents(self) -> torch.Tensor:
        return self.rows[: self.filled] if not self.full else self.rows


# ---------------------------------------------------------------------------------------------
# The method.


class Orchestra:
    """Cluster-assignment training against an EMA target, with local and global clustering."""

    local_modules: frozenset[str] = frozenset({CENTROIDS})

    def __init__(self, options: OrchestraOptions, context: MethodContext) -> None:
        self.options = options
        self.context = context
        self.num_global_centroids = (
            min(options.global_centroids, context.num_clients * options.local_centroids)
            if options.cap_global_centroids
            else options.global_centroids
        )
        # The EMA target, one module reused for every client (the BYOL family's helper).
        self.target = TargetNetwork(options.target_momentum)
        # Global mode: the server's FedAvg of the clients' targets (target key -> tensor); None
        # until the first aggregation, when clients start from the global online network.
        self._global_target: dict[str, torch.Tensor] | None = None
        self._memory: _ProjectionMemory | None = None
        self._generator: torch.Generator | None = None
        self._init_pass = False

    @property
    def _target(self) -> nn.ModuleDict | None:
        """The target module (None before the first ``begin_client``)."""
        return self.target.module

    # -- model parts ---------------------------------------------------------------------------

    def extra_modules(self) -> dict[str, nn.Module]:
        """Global centroids (random unit rows) and the rotation head, from the run seed."""
        gen = generator(self.context.seed, ORCHESTRA, _EXTRAS_KEY)
        dim = self.context.embed_dim
        centroids = losses.normalize(torch.randn(self.num_global_centroids, dim, generator=gen))
        head = nn.Linear(dim, 4)
        bound = 1 / math.sqrt(dim)  # PyTorch's default Linear initialisation, seeded here
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=gen)
            head.bias.uniform_(-bound, bound, generator=gen)
        return {CENTROIDS: GlobalCentroids(centroids), ROTATION_HEAD: head}

    # -- client hooks ----------------------------------------------------------------------------

    def begin_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> None:
        """Load the global (or the client's) target, else copy the online network; reset memory."""
        device = next(model.parameters()).device
        saved: Mapping[str, torch.Tensor] | None = None
        if self.options.target_mode == "global":
            saved = self._global_target
        elif stored is not None:
            saved = strip_prefix(stored.tensors, TARGET_PREFIX)
        # No target yet (first round, or first participation in client mode): it starts as the
        # received global online network, as the released code's copy at build time.
        self.target.load_state(model, saved)
        self._memory = _ProjectionMemory(self.options.memory_size, self.context.embed_dim, device)
        self._generator = generator(
            self.context.seed, ORCHESTRA, _CLIENT_KEY, round_index, client_id, device=device
        )
        self._init_pass = self.options.init_round and round_index == 0

    def local_loss(
        self,
        model: nn.Module,
        view1: torch.Tensor,
        view2: torch.Tensor,
        *,
        client_id: int,
        position: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_cluster + rotation_weight * L_rotation``; pushes the target projections to memory.

        In the initial round (``init_round``) only the memory is filled: the loss is a constant
        zero with no parameter in its graph, so the optimizer changes nothing (SGD skips
        parameters without a gradient, weight decay included).
        """
        target, memory, gen = self._client_parts()
        if self._init_pass:
            zero = torch.zeros((), device=view1.device)
            if not memory.full:
                memory.push(self._target_projection(target, view1))
            loss = torch.zeros((), device=view1.device, requires_grad=True)
            return loss, {"cluster": zero, "rotation": zero}
        zt1 = self._target_projection(target, view1)
        _, u2 = model(view2)
        turns = torch.randint(4, (view1.shape[0],), generator=gen, device=gen.device)
        turns = turns.to(view1.device)
        source = view1 if self.options.rotation_view == "view1" else view2
        _, u3 = model(rotate_quarter_turns(source, turns))
        extras = _part(model, "extras")
        centroids = _part(extras, CENTROIDS).get_buffer("global_centroids")
        with full_precision(view1.device):
            z2 = losses.normalize(u2.float())
            cluster = cluster_assignment_loss(
                z2, zt1, centroids.float(), temperature=self.options.temperature
            )
            logits = _part(extras, ROTATION_HEAD)(u3.float())
            rotation = F.cross_entropy(logits.float(), turns)
            loss = cluster + self.options.rotation_weight * rotation
        memory.push(zt1)
        return loss, {"cluster": cluster.detach(), "rotation": rotation.detach()}

    def after_step(self, model: nn.Module) -> None:
        """EMA of the target's parameters toward the online encoder and projector.

        The released code updates the target before each step's target forward; updating after
        each optimizer step gives the same sequence shifted by one.
        """
        if self._init_pass or self.target.module is None:
            return
        self.target.step(model)

    def end_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> tuple[ClientState, dict[str, torch.Tensor]]:
        """Send the local centroids (and, in global mode, the target); keep the target in client
        mode only."""
        target, memory, gen = self._client_parts()
        target_tensors = target.tensors()
        client_mode = self.options.target_mode == "client"
        state = ClientState(
            tensors=target_tensors if client_mode else {},
            scalars=dict(stored.scalars) if stored is not None else {},
        )
        payload: dict[str, torch.Tensor] = {} if client_mode else dict(target_tensors)
        if memory.filled > 0:
            o = self.options
            payload[PAYLOAD_KEY] = local_clustering(
                memory.contents(),
                o.local_centroids,
                iterations=o.local_clustering_iterations,
                sharpness=o.sinkhorn_sharpness,
                sinkhorn_iterations=o.local_sinkhorn_iterations,
                generator=gen,
            )
        self._memory = None
        self._init_pass = False
        return state, payload

    # -- server ----------------------------------------------------------------------------------

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
    ) -> dict[str, torch.Tensor]:
        """FedAvg of the weights (and, in global mode, of the targets), then the global
        clustering of all received local centroids."""
        new_state = fedavg_updates(global_state, updates)
        with_target = [u for u in updates if any(k.startswith(TARGET_PREFIX) for k in u.payload)]
        if self.options.target_mode == "global" and with_target:
            # The whole target state, BN buffers included, with the weights' FedAvg weights.
            self._global_target = fedavg(
                [strip_prefix(u.payload, TARGET_PREFIX) for u in with_target],
                [u.weight for u in with_target],
            )
        points = [u.payload[PAYLOAD_KEY] for u in updates if PAYLOAD_KEY in u.payload]
        if points:
            current = global_state[CENTROIDS_KEY]
            o = self.options
            new_state[CENTROIDS_KEY] = global_clustering(
                torch.cat([p.to(current.device) for p in points]),
                current,
                temperature=o.temperature,
                steps=o.server_steps,
                lr=o.server_lr,
                momentum=o.server_momentum,
                weight_decay=o.server_weight_decay,
                sharpness=o.sinkhorn_sharpness,
                sinkhorn_iterations=o.sinkhorn_iterations,
                sinkhorn_tolerance=o.sinkhorn_tolerance,
            ).to(current.dtype)
        return new_state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The global target (``target.*``) in global mode once it exists; else nothing (the
        centroids are part of the model, ``extras.centroids``)."""
        if self.options.target_mode != "global" or self._global_target is None:
            return {}
        return with_prefix(self._global_target, TARGET_PREFIX)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the global target (a checkpoint, or the server's state on a Flower client)."""
        target = strip_prefix(state, TARGET_PREFIX)
        self._global_target = (
            {k: v.detach().clone() for k, v in target.items()}
            if target and self.options.target_mode == "global"
            else None
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _client_parts(self) -> tuple[TargetNetwork, _ProjectionMemory, torch.Generator]:
        if self.target.module is None or self._memory is None or self._generator is None:
            raise RuntimeError("Orchestra.begin_client must be called before local training")
        return self.target, self._memory, self._generator

    @staticmethod
    def _target_projection(target: TargetNetwork, view: torch.Tensor) -> torch.Tensor:
        """``(batch, embed_dim)`` unit-norm float32 target projections, no gradient.

        As in the released code the target runs in training mode (batch statistics).
        """
        return losses.normalize(target.project(view).float())


def _part(module: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``module`` (typed; the model is an ``SSLModel``-like module)."""
    part = getattr(module, name)
    if not isinstance(part, nn.Module):
        raise TypeError(f"expected a submodule named {name!r}")
    return part
