"""Semi-supervised fine-tuning on a small labelled fraction (docs/evaluation.md).

The paper's protocol: a stratified labelled subset of 1% or 10% of the training images; the
pretrained encoder and a new linear head on its un-normalised output h are trained together with
cross-entropy, SGD with momentum 0.9 and no weight decay, learning rate 1e-3 for the encoder and
0.3 for the head, batch 128, 200 epochs, augmented with ``RandomResizedCrop(scale 0.64-1,
ratio 1)`` and a horizontal flip. The test set is evaluated every 50 epochs and the paper
reports the best of those evaluations; this module returns both that best and the last one.

Everything here works on tensors and returns values; reading runs and writing results is done
by :mod:`fedssd.experiments.evaluate`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedssd.data.augment import FINETUNE_AUGMENT, AugmentConfig, augment, to_float
from fedssd.errors import ConfigError, DataError
from fedssd.evaluation.features import check_labels


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """The fine-tuning schedule (defaults: the paper's values).

    Attributes:
        epochs: Passes over the labelled subset.
        batch_size: Mini-batch size; a last batch of one image is skipped (BatchNorm).
        encoder_lr: SGD learning rate of the encoder.
        head_lr: SGD learning rate of the linear head.
        momentum: SGD momentum (shared by both parameter groups; no weight decay).
        eval_every: Evaluate on the test set every this many epochs (and after the last).
        eval_batch_size: Images per forward pass of a test evaluation.
        augment: The training augmentation; its ``size`` is replaced by the images' own side.
    """

    epochs: int = 200
    batch_size: int = 128
    encoder_lr: float = 1e-3
    head_lr: float = 0.3
    momentum: float = 0.9
    eval_every: int = 50
    eval_batch_size: int = 1024
    augment: AugmentConfig = FINETUNE_AUGMENT

    def __post_init__(self) -> None:
        """Reject sizes and rates that cannot train."""
        for name in ("epochs", "batch_size", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"Fine-tuning {name} must be a positive integer, got {value}.")
        for name in ("encoder_lr", "head_lr"):
            value = getattr(self, name)
            if not value >= 0 or not math.isfinite(value):
                raise ConfigError(f"Fine-tuning {name} must be a finite number >= 0, got {value}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"Fine-tuning momentum must lie in [0, 1), got {self.momentum}.")


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    """Outcome of :func:`finetune`.

    Attributes:
        best_accuracy: Highest test accuracy of the periodic evaluations (what the paper
            reports; it is selected on the test set, which the paper's protocol accepts).
        last_accuracy: Test accuracy after the last epoch.
        best_epoch: The 1-based epoch at which ``best_accuracy`` was first reached.
        evaluations: ``(epoch, test accuracy)`` of every evaluation, in order.
        train_loss: Mean cross-entropy over the steps of the last epoch.
        encoder: The fine-tuned encoder (a copy; the one passed in is left unchanged).
        head: The trained ``Linear(feature_dim, num_classes)`` head.
    """

    best_accuracy: float
    last_accuracy: float
    best_epoch: int
    evaluations: list[tuple[int, float]]
    train_loss: float
    encoder: nn.Module = dataclasses.field(repr=False, compare=False)
    head: nn.Linear = dataclasses.field(repr=False, compare=False)


def stratified_fraction(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """A random labelled subset of about ``fraction`` of the samples, class by class.

    Class ``c`` with ``n_c`` of ``n`` samples gets ``fraction * n_c`` samples, rounded by the
    largest-remainder rule so that the quotas add up to ``round(fraction * n)`` (1% of CIFAR-10's
    50 000 training images is 50 per class), then raised to at least one sample per class, so a
    rare class is never left without a label.

    Args:
        labels: ``(n,)`` integer labels.
        fraction: Share of the samples to keep, in ``(0, 1]``.
        rng: Source of randomness (which samples of each class are kept).

    Returns:
        Sorted int64 indices into ``labels``.

    Raises:
        ConfigError: ``fraction`` is not in ``(0, 1]``.
        DataError: ``labels`` is not a non-empty 1-D integer array.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"The labelled fraction must lie in (0, 1], got {fraction}.")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"Labels must be a non-empty 1-D integer array, got dtype {labels.dtype} and shape "
            f"{labels.shape}."
        )
    classes, counts = np.unique(labels, return_counts=True)
    exact = fraction * counts
    quota = np.floor(exact).astype(np.int64)
    total = math.floor(fraction * labels.size + 0.5)
    leftover = max(total - int(quota.sum()), 0)
    # Largest remainders first; the stable sort breaks ties by class order, not by rng.
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    quota = np.clip(quota, 1, counts)
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=int(take), replace=False)
        for cls, take in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _check_split(images: torch.Tensor, labels: torch.Tensor, num_classes: int, name: str) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise DataError(
            f"Fine-tuning {name} images must be a non-empty uint8 tensor (n, channels, height, "
            f"width), got {images.dtype} with shape {tuple(images.shape)}."
        )
    check_labels(labels, images.shape[0], num_classes, f"Fine-tuning {name}")


def _seeded_head(feature_dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear``'s default initialisation (uniform in ``±1/sqrt(fan_in)``), from a generator."""
    head = nn.Linear(feature_dim, num_classes)
    bound = 1.0 / math.sqrt(feature_dim)
    with torch.no_grad():
        head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 * bound - bound)
        head.bias.copy_(torch.rand(head.bias.shape, generator=generator) * 2 * bound - bound)
    return head


@torch.no_grad()
def _test_accuracy(
    encoder: nn.Module,
    head: nn.Linear,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager[object],
) -> float:
    """Top-1 accuracy of ``head(encoder(x))`` on un-augmented images, in eval mode."""
    encoder.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = to_float(images[start : start + batch_size].to(device, non_blocking=True))
        with autocast:
            logits = head(encoder(x))
        truth = labels[start : start + batch_size].to(device)
        correct += int((logits.argmax(dim=1) == truth).sum())
    return correct / images.shape[0]


def finetune(
    encoder: nn.Module,
    *,
    feature_dim: int,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    settings: FinetuneSettings | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``encoder`` with a new linear head on labelled images.

    The copy is trained in train mode (BatchNorm uses and updates batch statistics) and
    evaluated in eval mode on the un-augmented test images every ``settings.eval_every`` epochs
    and after the last one. One generator seeded with ``seed`` draws the head's initial weights
    and another on ``device`` every shuffle and augmentation, so a seed gives the same result on
    a given device.

    Args:
        encoder: Maps ``(batch, channels, height, width)`` float images in ``[0, 1]`` to
            ``(batch, feature_dim)`` features h; not modified.
        feature_dim: Output size of the encoder (input size of the head).
        train_images: ``(n, channels, side, side)`` uint8 labelled images (square).
        train_labels: ``(n,)`` integer labels in ``[0, num_classes)``.
        test_images: ``(m, channels, side, side)`` uint8 test images.
        test_labels: ``(m,)`` integer labels in ``[0, num_classes)``.
        num_classes: Number of classes C of the ``Linear(feature_dim, C)`` head.
        settings: The schedule; None means the paper's (:class:`FinetuneSettings`).
        seed: Seed of the head's initialisation, the shuffling and the augmentation.
        device: Where to train; the labelled images are moved there whole.
        autocast_dtype: Mixed-precision dtype for the forward passes, or None for float32.
        log: Receives one line per test evaluation, if given.

    Returns:
        The best and last test accuracies, every evaluation, and the trained encoder and head.

    Raises:
        ConfigError: ``num_classes`` or ``feature_dim`` is not positive.
        DataError: The images or labels are empty, mis-shaped, not square or out of range.
    """
    settings = settings or FinetuneSettings()
    if num_classes < 1 or feature_dim < 1:
        raise ConfigError(
            f"Fine-tuning num_classes and feature_dim must be positive, got {num_classes} and "
            f"{feature_dim}."
        )
    _check_split(train_images, train_labels, num_classes, "training")
    _check_split(test_images, test_labels, num_classes, "test")
    height, width = train_images.shape[-2:]
    if height != width or test_images.shape[1:] != train_images.shape[1:]:
        raise DataError(
            f"Fine-tuning needs square images of one size, got training images "
            f"{tuple(train_images.shape[1:])} and test images {tuple(test_images.shape[1:])}."
        )
    say = log or (lambda _message: None)
    target = torch.device(device)
    crop = dataclasses.replace(settings.augment, size=int(height))
    model = copy.deepcopy(encoder).to(target)
    head = _seeded_head(feature_dim, num_classes, torch.Generator().manual_seed(seed)).to(target)
    generator = torch.Generator(device=target)
    generator.manual_seed(seed)
    optimizer = torch.optim.SGD(
        [
            {"params": list(model.parameters()), "lr": settings.encoder_lr},
            {"params": list(head.parameters()), "lr": settings.head_lr},
        ],
        lr=settings.head_lr,
        momentum=settings.momentum,
        weight_decay=0.0,
    )
    autocast: AbstractContextManager[object] = (
        torch.autocast(device_type=target.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    images = train_images.to(target)
    labels = train_labels.to(device=target, dtype=torch.long)
    evaluations: list[tuple[int, float]] = []
    train_loss = math.nan
    started = time.perf_counter()
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(images.shape[0], generator=generator, device=target)
        loss_sum = torch.zeros((), device=target)
        steps = 0
        for batch in order.split(settings.batch_size):
            if batch.numel() < 2:
                continue
            x = augment(images[batch], crop, generator=generator)
            with autocast:
                logits = head(model(x))
            loss = F.cross_entropy(logits.float(), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        train_loss = float(loss_sum) / max(steps, 1)
        if epoch % settings.eval_every and epoch != settings.epochs:
            continue
        accuracy = _test_accuracy(
            model,
            head,
            test_images,
            test_labels,
            batch_size=settings.eval_batch_size,
            device=target,
            autocast=autocast,
        )
        evaluations.append((epoch, accuracy))
        say(
            f"fine-tune epoch {epoch}/{settings.epochs}: loss {train_loss:.4f}, "
            f"test accuracy {100 * accuracy:.2f}% ({time.perf_counter() - started:.0f}s)"
        )
    best_epoch, best = max(evaluations, key=lambda item: (item[1], -item[0]))
    model.eval()
    return FinetuneResult(
        best_accuracy=best,
        last_accuracy=evaluations[-1][1],
        best_epoch=best_epoch,
        evaluations=evaluations,
        train_loss=train_loss,
        encoder=model,
        head=head,
    )
