"""Linear probe on frozen features (docs/evaluation.md).

The paper trains ``Linear(dim, C)`` on the cached, un-normalised encoder features h of the whole
labelled training set (no augmentation) with Adam, learning rate 3e-3, batch 512, 200 epochs and
cross-entropy, and reports test accuracy.

Speed: at 60000 x 128 features and batch 512 the probe takes 23 600 optimiser steps whose
matrices are tiny, so per-operation overhead dominates. The step is therefore written out by
hand without autograd or ``torch.optim``: the closed-form cross-entropy gradient of a linear
layer, ``x^T (softmax(x W^T + b) - onehot(y)) / batch``, followed by the Adam update exactly as
``torch.optim.Adam`` computes it (default betas and eps, no weight decay), applied to one flat
parameter buffer. The tests check it against autograd with ``torch.optim.Adam``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedssd.errors import ConfigError, DataError
from fedssd.evaluation.features import check_labels

_BETA1 = 0.9
_BETA2 = 0.999
_EPS = 1e-8


@dataclass(frozen=True)
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        accuracy: test accuracy after the last epoch; the number the paper reports.
        train_accuracy: training-set accuracy after the last epoch.
        best_accuracy: highest test accuracy seen after any epoch. It is selected on the test
            set, so it is optimistic and only a diagnostic, not a result to report.
        best_epoch: the 1-based epoch at which ``best_accuracy`` was first reached.
        weight: ``(num_classes, dim)`` trained weight on the CPU (not part of equality).
        bias: ``(num_classes,)`` trained bias on the CPU (not part of equality).
    """

    accuracy: float
    train_accuracy: float
    best_accuracy: float
    best_epoch: int
    weight: torch.Tensor = field(repr=False, compare=False)
    bias: torch.Tensor = field(repr=False, compare=False)


def _check_split(features: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str) -> None:
    if features.dim() != 2 or features.shape[0] == 0:
        raise DataError(
            f"Linear-probe {name} features must be a non-empty (n, dim) matrix, got shape "
            f"{tuple(features.shape)}."
        )
    check_labels(labels, features.shape[0], num_classes, f"Linear-probe {name}")


def _accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> float:
    predictions = torch.addmm(bias, features, weight.T).argmax(dim=1)
    return (predictions == labels).sum().item() / labels.shape[0]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 200,
    lr: float = 3e-3,
    batch_size: int = 512,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> LinearProbeResult:
    """Train a linear classifier on frozen features with Adam and cross-entropy.

    The layer starts like ``nn.Linear`` (weights and bias uniform in ``±1/sqrt(dim)``), drawn
    from a generator seeded with ``seed``, which also shuffles the training set every epoch, so
    the result is deterministic for a seed on a given device. The last, smaller batch of an
    epoch is kept. Features are used as given (the paper's probe uses un-normalised h).

    Args:
        train_features: ``(n_train, dim)`` training features.
        train_labels: ``(n_train,)`` integer labels in ``[0, num_classes)``.
        test_features: ``(n_test, dim)`` test features.
        test_labels: ``(n_test,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes C of the ``Linear(dim, C)`` layer.
        epochs: passes over the training set.
        lr: Adam learning rate.
        batch_size: training mini-batch size.
        seed: seed of initialisation and shuffling.
        device: device to train on; the features are copied there as float32.
        log: receives a one-line progress message ten times over the run, if given.

    Returns:
        The final test and train accuracies, the best test accuracy over epochs and the trained
        layer.

    Raises:
        ConfigError: if ``num_classes``, ``epochs``, ``lr`` or ``batch_size`` is not positive.
        DataError: if the features or labels are empty, mis-shaped or out of range.
    """
    if num_classes < 1 or epochs < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(
            f"Linear-probe num_classes, epochs, batch_size and lr must be positive, got "
            f"{num_classes}, {epochs}, {batch_size} and {lr}."
        )
    _check_split(train_features, train_labels, num_classes, "train")
    _check_split(test_features, test_labels, num_classes, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise DataError(
            f"Linear-probe train and test features differ in dim: {train_features.shape[1]} vs "
            f"{test_features.shape[1]}."
        )
    target = torch.device(device)
    x_train = train_features.to(target, torch.float32)
    y_train = train_labels.to(target, torch.long)
    x_test = test_features.to(target, torch.float32)
    y_test = test_labels.to(target, torch.long)
    n, dim = x_train.shape

    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(dim)
    # One flat buffer for weight and bias so the Adam update is a handful of whole-buffer ops.
    params = (torch.rand(num_classes * (dim + 1), generator=generator) * 2 - 1) * bound
    params = params.to(target)
    grad = torch.zeros_like(params)
    exp_avg = torch.zeros_like(params)
    exp_avg_sq = torch.zeros_like(params)
    weight = params[: num_classes * dim].view(num_classes, dim)
    bias = params[num_classes * dim :]
    grad_weight = grad[: num_classes * dim].view(num_classes, dim)
    grad_bias = grad[num_classes * dim :]

    # Preallocated batch buffers: fresh allocations of this size cost page faults every step.
    batch_x = torch.empty(batch_size, dim, device=target)
    batch_y = torch.empty(batch_size, dtype=torch.long, device=target)
    logits = torch.empty(batch_size, num_classes, device=target)
    delta = torch.empty(batch_size, num_classes, device=target)
    denom = torch.empty_like(params)
    minus_one = torch.full((batch_size, 1), -1.0, device=target)

    log_every = max(1, epochs // 10)
    best_accuracy, best_epoch, step = -1.0, 0, 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=generator).to(target)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            size = index.shape[0]
            x = torch.index_select(x_train, 0, index, out=batch_x[:size])
            y = torch.index_select(y_train, 0, index, out=batch_y[:size])
            torch.addmm(bias, x, weight.T, out=logits[:size])
            # d(mean cross-entropy)/d(logits) = (softmax - onehot) / batch.
            grad_logits = torch.softmax(logits[:size], dim=1, out=delta[:size])
            grad_logits.scatter_add_(1, y.unsqueeze(1), minus_one[:size]).div_(size)
            torch.mm(grad_logits.T, x, out=grad_weight)
            torch.sum(grad_logits, dim=0, out=grad_bias)
            step += 1
            exp_avg.lerp_(grad, 1 - _BETA1)
            exp_avg_sq.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
            torch.sqrt(exp_avg_sq, out=denom).div_(math.sqrt(1 - _BETA2**step)).add_(_EPS)
            params.addcdiv_(exp_avg, denom, value=-lr / (1 - _BETA1**step))
        accuracy = _accuracy(x_test, y_test, weight, bias)
        if accuracy > best_accuracy:
            best_accuracy, best_epoch = accuracy, epoch
        if log is not None and (epoch % log_every == 0 or epoch == epochs):
            log(f"linear probe epoch {epoch}/{epochs}: test accuracy {100 * accuracy:.2f}%")

    return LinearProbeResult(
        accuracy=accuracy,
        train_accuracy=_accuracy(x_train, y_train, weight, bias),
        best_accuracy=best_accuracy,
        best_epoch=best_epoch,
        weight=weight.cpu().clone(),
        bias=bias.cpu().clone(),
    )
