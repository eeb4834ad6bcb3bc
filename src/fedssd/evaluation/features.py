"""Frozen-encoder feature extraction for evaluation.

The paper evaluates the last round's global encoder in eval mode on un-augmented images with
inputs in [0, 1] and no mean/std normalisation (docs/evaluation.md). Features are returned on the
CPU as float32 so that they can be cached between evaluations whatever device produced them;
the evaluation functions move them to the device they compute on.
"""

from __future__ import annotations

import torch
from torch import nn

from fedssd.data.augment import to_float
from fedssd.errors import ConfigError, DataError

# The image side a feature-extraction batch size counts in (CIFAR's).
_BATCH_SIDE = 32


def check_labels(labels: torch.Tensor, count: int, num_classes: int, what: str) -> None:
    """Refuse labels that are not ``count`` integers in ``[0, num_classes)``.

    Args:
        labels: The labels to check.
        count: How many there must be (one per image or feature row).
        num_classes: The number of classes.
        what: What they label, starting the message (e.g. ``"kNN bank"``).

    Raises:
        DataError: Wrong shape or dtype, or a label out of range.
    """
    if labels.shape != (count,) or labels.is_floating_point():
        raise DataError(
            f"{what} labels must be an integer vector of length {count}, got {labels.dtype} "
            f"with shape {tuple(labels.shape)}."
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"{what} labels must lie in [0, {num_classes}), got values from "
            f"{int(labels.min())} to {int(labels.max())}; check num_classes."
        )


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(
            f"Images must be a uint8 tensor of shape (n, channels, height, width), got "
            f"{images.dtype} with shape {tuple(images.shape)}; load the dataset with fedssd.data."
        )


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a model over all images in eval mode and collect its two outputs.

    The model must already live on ``device``; it is not moved. Every submodule is put in eval
    mode for the extraction (BatchNorm uses its running statistics and leaves them unchanged) and
    each submodule's previous train/eval mode is restored afterwards, even on error.

    Args:
        model: a module whose ``forward(x)`` returns ``(h, z_raw)``: ``(batch, feature_dim)``
            encoder output and ``(batch, embed_dim)`` projector output, both un-normalised.
        images: ``(n, channels, height, width)`` uint8 images, on the CPU or on ``device``.
        batch_size: number of 32x32 images per forward pass; larger images go in proportionally
            fewer (at least one), so that a pass holds no more pixels: the activations of 1024
            images of 224x224 would need gigabytes.
        device: device the forward passes run on.

    Returns:
        ``(h, z_raw)``: ``(n, feature_dim)`` and ``(n, embed_dim)`` float32 tensors on the CPU.

    Raises:
        DataError: if ``images`` is not a 4-d uint8 tensor or is empty.
        ConfigError: if ``batch_size`` is not positive.
    """
    _check_images(images)
    if images.shape[0] == 0:
        raise DataError("Cannot extract features from an empty image tensor; pass at least one.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}.")
    target = torch.device(device)
    pixels = images.shape[-2] * images.shape[-1]
    per_pass = (
        max(1, batch_size * _BATCH_SIDE**2 // pixels) if pixels > _BATCH_SIDE**2 else batch_size
    )
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        h_parts: list[torch.Tensor] = []
        z_parts: list[torch.Tensor] = []
        for start in range(0, images.shape[0], per_pass):
            x = to_float(images[start : start + per_pass].to(target, non_blocking=True))
            h, z_raw = model(x)
            h_parts.append(h.float().cpu())
            z_parts.append(z_raw.float().cpu())
    finally:
        for module, mode in modes:
            module.training = mode
    return torch.cat(h_parts), torch.cat(z_parts)
