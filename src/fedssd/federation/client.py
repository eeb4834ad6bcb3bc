"""Local training of one client in one round."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_update

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


class LocalSGD:
    """SGD with momentum and weight decay through PyTorch's functional update
    (``torch.optim.sgd.sgd``, the function ``torch.optim.SGD.step`` calls with the same
    arguments), so the same kernels and the same numbers, without the optimizer class: its
    first ``step`` imports ``torch._dynamo``, about 2 CPU-seconds at the start of every process
    that trains, and a Flower ClientApp is a fresh process for every message.

    Args:
        params: The parameters to train.
        lr: Learning rate.
        momentum: Momentum (0 for none).
        weight_decay: L2 weight decay added to the gradient.
    """

    def __init__(
        self, params: Sequence[torch.Tensor], *, lr: float, momentum: float, weight_decay: float
    ) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.fused = fused_sgd(self.params)
        self.momentum_buffers: dict[int, torch.Tensor] = {}  # position in params -> buffer

    def zero_grad(self) -> None:
        """Drop every gradient (``zero_grad(set_to_none=True)``)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """One update of the parameters that have a gradient."""
        held = [(k, p, p.grad) for k, p in enumerate(self.params) if p.grad is not None]
        params = [p for _, p, _ in held]
        grads = [g for _, _, g in held if g is not None]
        buffers = [self.momentum_buffers.get(k) for k, _, _ in held]
        with torch.no_grad():
            sgd_update(
                params,
                grads,
                buffers,
                has_sparse_grad=any(g.is_sparse for g in grads),
                foreach=None,
                fused=self.fused,
                weight_decay=self.weight_decay,
                momentum=self.momentum,
                lr=self.lr,
                dampening=0.0,
                nesterov=False,
                maximize=False,
            )
        if self.momentum != 0:
            for (k, _, _), buffer in zip(held, buffers, strict=True):
                if buffer is not None:
                    self.momentum_buffers[k] = buffer


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
    optimizer = LocalSGD(
        params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    device_type = images.device.type
    autocast: AbstractContextManager[object] = (
        torch.autocast(device_type=device_type, dtype=settings.autocast_dtype)
        if settings.autocast_dtype is not None
        else nullcontext()
    )
    # float16 trains through a gradient scaler, which steps a torch.optim optimizer (the same
    # update as the optimizer above).
    scaler: torch.amp.GradScaler | None = None
    scaled: torch.optim.SGD | None = None
    if settings.autocast_dtype == torch.float16:
        scaler = torch.amp.GradScaler(device_type)
        scaled = torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            fused=fused_sgd(params),
        )
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
            optimizer.zero_grad()
            if scaler is None or scaled is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(scaled)  # skipped when the scaled gradients are not finite
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
