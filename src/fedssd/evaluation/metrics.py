"""Representation-quality metrics: uniformity, alignment and effective rank.

Uniformity and alignment follow Wang & Isola (ICML 2020) with t = 2 and alpha = 2; effective rank
follows Roy & Vetterli (EUSIPCO 2007). SSD (Fang et al., ICCV 2025) reports ``-L_unif`` globally,
within each client and between pairs of clients; :func:`representation_metrics` computes all of
them on a bounded, seeded sample.

Pairwise sums are exact, not estimated: the squared-distance matrix is visited a tile of about
``chunk_size**2`` entries at a time and each tile is reduced by a log-sum-exp in float64, so
memory stays bounded for 50k x 512 features and nothing underflows for large ``t``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fedssd.errors import ConfigError, DataError


def _unit_rows(z: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows, computing in float32 at least (float64 stays float64)."""
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return F.normalize(z, dim=1)


def _check_matrix(z: torch.Tensor, name: str) -> None:
    if z.dim() != 2:
        raise DataError(f"{name} must be an (n, dim) matrix, got shape {tuple(z.shape)}.")


def _check_chunk(t: float, chunk_size: int) -> None:
    if not t > 0:
        raise ConfigError(f"The uniformity temperature t must be positive, got {t}.")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size}.")


def _tile_logsumexp(
    a: torch.Tensor, b: torch.Tensor, *, t: float, strict_upper: bool
) -> torch.Tensor:
    """Log-sum-exp of ``-t * ||a_i - b_j||^2`` over a tile of unit vectors, as a float64 scalar.

    With ``strict_upper`` only entries with ``j > i`` count (a tile on the diagonal of the
    symmetric pair matrix, where ``a`` and ``b`` are the same rows).
    """
    # ||a - b||^2 = 2 - 2 a.b for unit rows; clamping removes the rounding that would make the
    # distance of identical points slightly negative.
    squared = (2.0 - 2.0 * (a @ b.T)).clamp_(min=0.0).double()
    exponent = squared.mul_(-t)
    if strict_upper:
        upper = torch.ones_like(exponent, dtype=torch.bool).triu_(diagonal=1)
        exponent = exponent[upper]
    return torch.logsumexp(exponent.flatten(), dim=0)


def uniformity_loss(z: torch.Tensor, *, t: float = 2.0, chunk_size: int = 2048) -> float:
    """Exact uniformity loss ``log mean_{i<j} exp(-t ||z_i - z_j||^2)`` of L2-normalised rows.

    Wang & Isola (2020) over all distinct pairs. The value lies in ``[-4t, 0]``; the paper
    reports its negation, which for many points spread over a high-dimensional sphere (squared
    distances near 2) approaches ``2t``, i.e. about 4 for t = 2.

    Args:
        z: ``(n, dim)`` features, ``n >= 2`` (any norm; rows are normalised here).
        t: temperature of the Gaussian potential.
        chunk_size: side of the square tiles of the pair matrix processed at once.

    Returns:
        The loss as a Python float.

    Raises:
        ConfigError: if ``t`` or ``chunk_size`` is not positive.
        DataError: if ``z`` is not a matrix with at least two rows.
    """
    _check_chunk(t, chunk_size)
    _check_matrix(z, "Uniformity features")
    n = z.shape[0]
    if n < 2:
        raise DataError(f"Uniformity needs at least two feature rows, got {n}.")
    unit = _unit_rows(z)
    tiles = []
    for row in range(0, n, chunk_size):
        a = unit[row : row + chunk_size]
        for col in range(row, n, chunk_size):
            b = unit[col : col + chunk_size]
            tiles.append(_tile_logsumexp(a, b, t=t, strict_upper=col == row))
    pairs = n * (n - 1) / 2
    return float(torch.logsumexp(torch.stack(tiles), dim=0)) - math.log(pairs)


def cross_uniformity_loss(
    a: torch.Tensor, b: torch.Tensor, *, t: float = 2.0, chunk_size: int = 2048
) -> float:
    """Uniformity between two sets: ``log mean_{i,j} exp(-t ||a_i - b_j||^2)`` over all pairs.

    Args:
        a: ``(n_a, dim)`` features, ``n_a >= 1`` (rows are normalised here).
        b: ``(n_b, dim)`` features, ``n_b >= 1`` (rows are normalised here).
        t: temperature of the Gaussian potential.
        chunk_size: side of the square tiles of the pair matrix processed at once.

    Returns:
        The loss (<= 0) as a Python float.

    Raises:
        ConfigError: if ``t`` or ``chunk_size`` is not positive.
        DataError: if either set is empty or the feature dimensions differ.
    """
    _check_chunk(t, chunk_size)
    _check_matrix(a, "Cross-uniformity features")
    _check_matrix(b, "Cross-uniformity features")
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] != b.shape[1]:
        raise DataError(
            f"Cross-uniformity needs two non-empty sets of the same dim, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}."
        )
    a_unit, b_unit = _unit_rows(a), _unit_rows(b.to(a.device))
    if a_unit.dtype != b_unit.dtype:
        a_unit, b_unit = a_unit.double(), b_unit.double()
    tiles = [
        _tile_logsumexp(
            a_unit[row : row + chunk_size],
            b_unit[col : col + chunk_size],
            t=t,
            strict_upper=False,
        )
        for row in range(0, a.shape[0], chunk_size)
        for col in range(0, b.shape[0], chunk_size)
    ]
    pairs = a.shape[0] * b.shape[0]
    return float(torch.logsumexp(torch.stack(tiles), dim=0)) - math.log(pairs)


def alignment_loss(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """Alignment ``mean_i ||z1_i - z2_i||^2`` of L2-normalised paired rows (alpha = 2).

    Args:
        z1: ``(n, dim)`` features of the first view (rows are normalised here).
        z2: ``(n, dim)`` features of the second view of the same samples.

    Returns:
        The loss, in [0, 4], as a Python float.

    Raises:
        DataError: if the two views do not have the same non-empty ``(n, dim)`` shape.
    """
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] == 0:
        raise DataError(
            f"Alignment needs two non-empty (n, dim) views of the same shape, got "
            f"{tuple(z1.shape)} and {tuple(z2.shape)}."
        )
    difference = _unit_rows(z1).double() - _unit_rows(z2.to(z1.device)).double()
    return float(difference.pow(2).sum(dim=1).mean())


def effective_rank(features: torch.Tensor) -> float:
    """Effective rank ``exp(-sum_i p_i log p_i)``, ``p_i = s_i / sum_j s_j`` (Roy & Vetterli 2007).

    ``s`` are the singular values of the matrix as given; the caller decides whether rows are
    normalised or centred. The value lies in ``[1, min(n, dim)]`` for a non-zero matrix; the zero
    matrix has rank 0 and gives 0.0.

    Args:
        features: ``(n, dim)`` feature matrix.

    Returns:
        The effective rank as a Python float.

    Raises:
        DataError: if ``features`` is not a non-empty matrix.
    """
    _check_matrix(features, "Effective-rank features")
    if features.numel() == 0:
        raise DataError("Effective rank needs a non-empty feature matrix.")
    singular = torch.linalg.svdvals(features.double())
    total = singular.sum()
    if total == 0:
        return 0.0
    p = singular / total
    # 0 log 0 = 0: zero singular values carry no mass.
    entropy = -torch.special.xlogy(p, p).sum()
    return float(entropy.exp())


def _grouped_logsumexp(
    values: torch.Tensor, groups: torch.Tensor, num_groups: int, *, dim: int
) -> torch.Tensor:
    """Log-sum-exp of ``values`` over the entries of each group along ``dim``.

    Args:
        values: float64 tensor; ``-inf`` entries contribute nothing.
        groups: ``(values.shape[dim],)`` group index in ``[0, num_groups)`` of each entry.
        num_groups: number of groups.
        dim: dimension that is reduced.

    Returns:
        ``values`` with ``dim`` replaced by ``num_groups``; ``-inf`` for a group with no entries.
    """
    shape = list(values.shape)
    shape[dim] = num_groups
    index = groups.view([-1 if d == dim else 1 for d in range(values.dim())]).expand_as(values)
    peak = values.new_full(shape, -math.inf).scatter_reduce_(dim, index, values, "amax")
    # A group holding only -inf (or nothing) is shifted by 0 so that it sums to exp(-inf) = 0.
    peak = torch.where(peak.isfinite(), peak, 0.0)
    shifted = (values - peak.gather(dim, index)).exp_()
    return values.new_zeros(shape).scatter_add_(dim, index, shifted).log_().add_(peak)


def _group_pair_logsumexp(
    unit: torch.Tensor, groups: torch.Tensor, num_groups: int, *, t: float, chunk_size: int
) -> torch.Tensor:
    """Log-sum-exp of ``-t ||u_i - u_j||^2`` over ordered pairs ``i != j`` per pair of groups.

    All group pairs come out of one pass over the rows, ``chunk_size**2`` entries at a time,
    instead of one small computation per pair of groups.

    Args:
        unit: ``(n, dim)`` unit-norm rows.
        groups: ``(n,)`` group index of each row in ``[0, num_groups)``.
        num_groups: number of groups K.
        t: temperature of the Gaussian potential.
        chunk_size: about ``chunk_size**2`` pair entries are held at once.

    Returns:
        ``(K, K)`` float64 matrix; entry ``(k, l)`` sums over rows ``i`` of group k and ``j`` of
        group l, ``-inf`` where there is no such pair.
    """
    n = unit.shape[0]
    rows = max(1, chunk_size * chunk_size // max(n, 1))
    total = torch.full((num_groups, num_groups), -math.inf, dtype=torch.float64, device=unit.device)
    for start in range(0, n, rows):
        block = unit[start : start + rows]
        exponent = (2.0 - 2.0 * (block @ unit.T)).clamp_(min=0.0).double().mul_(-t)
        local = torch.arange(block.shape[0], device=unit.device)
        exponent[local, local + start] = -math.inf
        per_row = _grouped_logsumexp(exponent, groups, num_groups, dim=1)
        per_group = _grouped_logsumexp(per_row, groups[start : start + rows], num_groups, dim=0)
        total = torch.logaddexp(total, per_group)
    return total


def _sample_rows(count: int, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a seeded random subset of ``min(count, limit)`` of ``range(count)``."""
    return torch.randperm(count, generator=generator)[: min(count, limit)]


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def representation_metrics(
    features: torch.Tensor,
    client_ids: torch.Tensor,
    *,
    t: float = 2.0,
    max_samples: int = 10000,
    max_per_client: int = 1000,
    seed: int = 0,
    chunk_size: int = 2048,
) -> dict[str, Any]:
    """Global, intra-client and inter-client uniformity and effective rank (docs/evaluation.md).

    Two seeded random samples keep the cost bounded, each of at most ``max_samples`` rows:

    - the *global* sample is drawn uniformly from all rows, so it follows the clients' true data
      shares; ``uniformity_global`` and ``effective_rank`` use it;
    - the *per-client* sample takes ``q = min(max_per_client, max_samples // K)`` rows of each of
      the K clients (all rows of a smaller client); the intra and inter values use it. A value
      that needs more rows than a client contributes (two within a client, one per client
      between clients) is ``None``, so a final evaluation never fails on a tiny client.

    Uniformity values are reported as ``-L_unif`` (higher is more uniform; at most about 4 for
    t = 2) and use L2-normalised rows. ``effective_rank`` is taken over the singular values of
    the sampled rows as given (raw, un-normalised features), as the SSD paper defines it, so
    rows of very different norms weigh accordingly.

    Args:
        features: ``(n, dim)`` features (e.g. encoder outputs h of the training set).
        client_ids: ``(n,)`` integer id of the client owning each row.
        t: temperature of the uniformity potential.
        max_samples: upper bound on the rows of each sample.
        max_per_client: upper bound on the rows taken from one client.
        seed: seed of the sampling generator.
        chunk_size: the pair matrices are processed ``chunk_size**2`` entries at a time.

    Returns:
        A JSON-serialisable dict of plain Python values:
        ``clients`` (sorted client ids, the row order of the per-client values),
        ``samples_global`` (rows in the global sample),
        ``samples_per_client`` (rows taken from each client),
        ``uniformity_global``,
        ``uniformity_intra`` (per client; ``None`` for a client with fewer than two rows),
        ``uniformity_intra_mean`` (over the clients that have a value),
        ``uniformity_inter`` (K x K symmetric matrix of ``-`` cross-uniformity between clients
        k and l, the diagonal holding the intra values),
        ``uniformity_inter_mean`` (over the pairs k != l that have a value, else ``None``),
        ``effective_rank`` (of the raw features of the global sample).

    Raises:
        ConfigError: if ``t`` is not positive, ``max_samples < 2`` or ``max_per_client < 1``.
        DataError: if the shapes disagree, ``client_ids`` is not an integer vector or there are
            fewer than two rows.
    """
    _check_matrix(features, "Representation features")
    if client_ids.shape != (features.shape[0],) or client_ids.is_floating_point():
        raise DataError(
            f"client_ids must be an integer vector with one id per feature row, got "
            f"{client_ids.dtype} with shape {tuple(client_ids.shape)} for features of shape "
            f"{tuple(features.shape)}."
        )
    if features.shape[0] < 2:
        raise DataError(
            f"Representation metrics need at least two feature rows, got {features.shape[0]}."
        )
    _check_chunk(t, chunk_size)
    clients = torch.unique(client_ids.cpu()).tolist()
    if max_samples < 2 or max_per_client < 1:
        raise ConfigError(
            f"max_samples must be at least 2 and max_per_client at least 1, got {max_samples} "
            f"and {max_per_client}."
        )
    per_client = min(max_per_client, max_samples // len(clients))
    generator = torch.Generator().manual_seed(seed)
    unit = _unit_rows(features)
    ids = client_ids.to(unit.device)

    global_rows = _sample_rows(unit.shape[0], max_samples, generator).to(unit.device)
    global_sample = unit[global_rows]
    global_raw = features[global_rows]

    picks = []
    for client in clients:
        rows = torch.nonzero(ids == client).squeeze(1)
        picks.append(rows[_sample_rows(rows.shape[0], per_client, generator).to(unit.device)])
    counts = torch.tensor([pick.shape[0] for pick in picks], device=unit.device)
    size = len(clients)
    groups = torch.repeat_interleave(torch.arange(size, device=unit.device), counts)
    log_sums = _group_pair_logsumexp(
        unit[torch.cat(picks)], groups, size, t=t, chunk_size=chunk_size
    )
    # Ordered pairs: n_k n_l between clients, n_k (n_k - 1) within one (each i<j pair twice).
    pairs = torch.outer(counts, counts) - torch.diag(counts)
    log_means = log_sums - pairs.double().log()
    # (k, l) and (l, k) sum the same pairs but round differently; the average is exactly symmetric.
    values = (-(log_means + log_means.T) / 2).tolist()
    present = (pairs > 0).tolist()
    inter: list[list[float | None]] = [
        [values[k][m] if present[k][m] else None for m in range(size)] for k in range(size)
    ]
    intra = [inter[k][k] for k in range(size)]
    off_diagonal = [
        value for k in range(size) for m in range(k + 1, size) if (value := inter[k][m]) is not None
    ]

    return {
        "clients": [int(client) for client in clients],
        "samples_global": int(global_sample.shape[0]),
        "samples_per_client": counts.tolist(),
        "uniformity_global": -uniformity_loss(global_sample, t=t, chunk_size=chunk_size),
        "uniformity_intra": intra,
        "uniformity_intra_mean": _mean_or_none([v for v in intra if v is not None]),
        "uniformity_inter": inter,
        "uniformity_inter_mean": _mean_or_none(off_diagonal),
        "effective_rank": effective_rank(global_raw),
    }
