"""Local training of one client in one round."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from fedssd.data.augment import AugmentConfig, two_views
from fedssd.methods.protocol import Method


@dataclasses.dataclass(frozen=True)
class LocalSettings:
    """How a client trains (docs/methods.md, "The paper's protocol", gives the
    SSD paper's values).

    Attributes:
        epochs: Local epochs.
        batch_size: Mini-batch size; a last batch of one sample is skipped (BatchNorm).
        drop_last: Skip each epoch's last batch when it is smaller than ``batch_size`` (the
            released SSD loaders did so for K <= 10). A client with fewer samples than a batch
            then trains no step and is left out of the round's aggregation.
        lr: Learning rate of this round.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        augment: The two-view augmentation.
        autocast_dtype: Mixed-precision dtype, or None for full precision. float16 trains with
            a gradient scaler (``torch.amp.GradScaler``), fresh each round like the optimizer,
            so it holds nothing a checkpoint must keep; a step whose scaled gradients overflow
            is skipped by the scaler (the weights stay as they were) but still counts as a
            batch.
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    augment: AugmentConfig
    autocast_dtype: torch.dtype | None = None
    drop_last: bool = False


@dataclasses.dataclass(frozen=True)
class LocalResult:
    """What local training reports.

    Attributes:
        client_id: The client's id.
        num_batches: Mini-batches trained on (the FedAvg weight; with ``drop_last`` only the full
            batches count).
        num_samples: Samples the client holds.
        loss: Mean loss over its steps.
        parts: Mean of each named loss part over its steps.
        seconds: Wall time.
    """

    client_id: int
    num_batches: int
    num_samples: int
    loss: float
    parts: dict[str, float]
    seconds: float

    @property
    def finite(self) -> bool:
        """Whether every step's loss was a finite number (a NaN or infinity in any step makes
        the mean non-finite)."""
        return math.isfinite(self.loss)


def fused_sgd(params: Sequence[torch.Tensor]) -> bool | None:
    """Whether SGD may use its fused kernel, one kernel for every parameter's update instead of
    one per tensor (about 3 times faster on a CPU for the small encoder).

    Returns:
        True for floating-point parameters, all on a CPU or CUDA device; otherwise None, which
        leaves the choice to PyTorch.
    """
    fusable = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )
    return True if fusable else None


def local_train(
    model: nn.Module,
    method: Method,
    images: torch.Tensor,
    indices: torch.Tensor,
    *,
    settings: LocalSettings,
    generator: torch.Generator,
    client_id: int,
    position: int,
    after_step: Callable[[nn.Module], None] | None = None,
) -> LocalResult:
    """Train ``model`` in place on one client's data with a fresh SGD optimizer.

    Args:
        model: The client model, already holding the global weights.
        method: Gives the loss of each step.
        images: ``(n, channels, height, width)`` uint8, the whole dataset, on the training device.
        indices: ``(m,)`` int64 indices of this client's images, on the same device.
        settings: Local schedule and optimizer.
        generator: The client's random stream for this round (shuffling and augmentation).
        client_id: The client's id.
        position: The client's position in this round's sample.
        after_step: Called with the model after every optimizer step (EMA target updates).

    Returns:
        Batch count, mean loss and its parts.
    """
    start = time.perf_counter()
    model.train()
    # Parameters a method freezes (target networks, centroids) are not the optimizer's.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        fused=fused_sgd(params),
    )
    device_type = images.device.type
    autocast: AbstractContextManager[object] = (
        torch.autocast(device_type=device_type, dtype=settings.autocast_dtype)
        if settings.autocast_dtype is not None
        else nullcontext()
    )
    scaler = torch.amp.GradScaler(device_type) if settings.autocast_dtype == torch.float16 else None
    total = torch.zeros((), device=images.device)
    sums: dict[str, torch.Tensor] = {}
    steps = 0
    smallest = settings.batch_size if settings.drop_last else 2
    for _ in range(settings.epochs):
        order = indices[
            torch.randperm(indices.numel(), generator=generator, device=generator.device)
        ]
        for batch in order.split(settings.batch_size):
            if batch.numel() < smallest:
                continue
            view1, view2 = two_views(images[batch], settings.augment, generator=generator)
            with autocast:
                loss, parts = method.local_loss(
                    model, view1, view2, client_id=client_id, position=position
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)  # skipped when the scaled gradients are not finite
                scaler.update()
            if after_step is not None:
                after_step(model)
            total += loss.detach().float()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0) + value.float()
            steps += 1
    denominator = max(steps, 1)
    # The total and every part in one read-back (one device sync); all are float32 scalars.
    read_total, *read_parts = torch.stack([total, *sums.values()]).tolist()
    return LocalResult(
        client_id=client_id,
        num_batches=steps,
        num_samples=int(indices.numel()),
        loss=read_total / denominator,
        parts={name: value / denominator for name, value in zip(sums, read_parts, strict=True)},
        seconds=time.perf_counter() - start,
    )
