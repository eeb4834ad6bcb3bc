"""Weighted k-nearest-neighbour monitor.

The kNN monitor of instance discrimination (Wu et al., CVPR 2018) as used by SimCLR-style CIFAR
experiments and by SSD (Fang et al., ICCV 2025): features are L2-normalised, each query's k most
cosine-similar bank entries vote for their class with weight ``exp(similarity / temperature)``
and the class with the largest summed weight is predicted (k = 200, temperature = 0.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedssd.errors import ConfigError, DataError
from fedssd.evaluation.features import check_labels


def _check_knn_inputs(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int,
) -> None:
    if k < 1:
        raise ConfigError(f"kNN k must be a positive integer, got {k}.")
    if not temperature > 0:
        raise ConfigError(f"kNN temperature must be positive, got {temperature}.")
    if chunk_size < 1:
        raise ConfigError(f"kNN chunk_size must be a positive integer, got {chunk_size}.")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes}.")
    if bank.dim() != 2 or queries.dim() != 2 or bank.shape[1] != queries.shape[1]:
        raise DataError(
            f"kNN bank and queries must be (n, dim) matrices of the same dim, got shapes "
            f"{tuple(bank.shape)} and {tuple(queries.shape)}."
        )
    if bank.shape[0] == 0:
        raise DataError("The kNN feature bank is empty; pass at least one labelled feature.")
    check_labels(bank_labels, bank.shape[0], num_classes, "kNN bank")


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predict query classes by a similarity-weighted vote of their k nearest bank entries.

    Computation runs on the bank's device; queries are processed ``chunk_size`` at a time so the
    similarity matrix held at once is ``(chunk_size, n_bank)``. If ``k`` exceeds the bank size the
    whole bank votes. Ties between class scores go to the smallest class index.

    Args:
        bank: ``(n_bank, dim)`` features of the labelled bank (any norm; normalised here).
        bank_labels: ``(n_bank,)`` integer labels in ``[0, num_classes)``.
        queries: ``(n_query, dim)`` features to classify (any norm; normalised here).
        num_classes: number of classes.
        k: number of neighbours that vote.
        temperature: softmax-like temperature of the vote weights ``exp(sim / temperature)``.
        chunk_size: number of queries handled per similarity matrix.

    Returns:
        ``(n_query,)`` int64 predicted labels on the bank's device.

    Raises:
        ConfigError: if ``k``, ``temperature``, ``chunk_size`` or ``num_classes`` is not positive.
        DataError: if shapes disagree, the bank is empty or labels are out of range.
    """
    _check_knn_inputs(
        bank,
        bank_labels,
        queries,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    device = bank.device
    bank_unit = F.normalize(bank.float(), dim=1)
    labels = bank_labels.to(device=device, dtype=torch.long)
    neighbours = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], chunk_size):
        chunk = F.normalize(queries[start : start + chunk_size].to(device).float(), dim=1)
        similarity, index = (chunk @ bank_unit.T).topk(neighbours, dim=1)
        weights = similarity.div_(temperature).exp_()
        scores = torch.zeros(chunk.shape[0], num_classes, device=device)
        scores.scatter_add_(1, labels[index], weights)
        predictions.append(scores.argmax(dim=1))
    if not predictions:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(predictions)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` on labelled queries.

    Args:
        bank: ``(n_bank, dim)`` features of the labelled bank.
        bank_labels: ``(n_bank,)`` integer labels in ``[0, num_classes)``.
        queries: ``(n_query, dim)`` features to classify, ``n_query >= 1``.
        query_labels: ``(n_query,)`` integer true labels of the queries.
        num_classes: number of classes.
        k: number of neighbours that vote.
        temperature: temperature of the vote weights.
        chunk_size: number of queries handled per similarity matrix.

    Returns:
        Fraction of correctly classified queries, in [0, 1].

    Raises:
        ConfigError: as :func:`knn_predict`.
        DataError: as :func:`knn_predict`, or if there are no queries or their labels do not
            match them in length.
    """
    if queries.dim() != 2 or queries.shape[0] == 0 or query_labels.shape != (queries.shape[0],):
        raise DataError(
            f"kNN queries must be a non-empty (n, dim) matrix with one label each, got shapes "
            f"{tuple(queries.shape)} and {tuple(query_labels.shape)}."
        )
    predictions = knn_predict(
        bank,
        bank_labels,
        queries,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    correct = (predictions == query_labels.to(predictions.device)).sum().item()
    return correct / queries.shape[0]
