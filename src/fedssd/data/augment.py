"""Batched two-view image augmentation on tensors, on whatever device the images live on.

The pipeline is SimCLR's CIFAR augmentation as the SSD paper (Fang et al., ICCV 2025)
uses it (docs/methods.md, "The paper's protocol"):
``RandomResizedCrop -> RandomHorizontalFlip -> RandomApply(ColorJitter, p) -> RandomGrayscale``,
inputs scaled to ``[0, 1]`` with no mean/std normalisation. Each transform follows the documented
semantics of its torchvision namesake, written here for a whole batch at once: every random
choice is drawn for all images in one call from an explicit ``torch.Generator``, the crop, resize
and flip are one batched bilinear sampling (a pair of batched matrix products when the images
are larger than the output, so that shrinking crops are antialiased), and the colour jitter's
per-image random order is handled slot by slot with a per-image colour matrix, so there is no
loop over images.

Two differences from torchvision, both deliberate: grayscale and the contrast mean use PIL's
luminance weights ``(0.299, 0.587, 0.114)`` (ITU-R BT.601). The released SSD pipeline ran
torchvision's transforms on tensors, whose weights are ``(0.2989, 0.587, 0.114)``: the red weight
differs by 1e-4, about a fortieth of one uint8 level for any input. Colour values stay in
float instead of being rounded to uint8 after every PIL operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fedssd.errors import ConfigError, DataError

# torchvision's RandomResizedCrop tries this many random boxes before its central fallback.
_CROP_ATTEMPTS = 10
_LUMA = (0.299, 0.587, 0.114)
# Jitter operation ids, in the order of the columns of AugmentParams.factors.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the augmentation pipeline (torchvision names and meanings).

    Attributes:
        size: Output side length; the crop is resized to ``(size, size)``.
        crop_scale: Range of the crop's area as a fraction of the image's area.
        crop_ratio: Range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_p: Probability of a horizontal flip.
        brightness: Brightness factor drawn from ``U[max(0, 1 - b), 1 + b]``.
        contrast: Contrast factor drawn from ``U[max(0, 1 - c), 1 + c]``.
        saturation: Saturation factor drawn from ``U[max(0, 1 - s), 1 + s]``.
        hue: Hue shift drawn from ``U[-h, h]``, in turns (at most 0.5).
        jitter_p: Probability that the colour jitter is applied to an image.
        grayscale_p: Probability of converting an image to grayscale.
    """

    size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_p: float = 0.8
    grayscale_p: float = 0.2

    def __post_init__(self) -> None:
        """Reject values torchvision would reject or that make no sense."""
        if self.size < 1:
            raise ConfigError(f"augment size must be a positive integer, got {self.size}.")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(
                f"augment crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}."
            )
        low, high = self.crop_ratio
        if not 0.0 < low <= high:
            raise ConfigError(
                f"augment crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}."
            )
        for name in ("flip_p", "jitter_p", "grayscale_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment {name} must be a probability in [0, 1], got {value}.")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if value < 0.0:
                raise ConfigError(f"augment {name} must be non-negative, got {value}.")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"augment hue must lie in [0, 0.5], got {self.hue}.")


SSL_AUGMENT = AugmentConfig()
"""The paper's pretraining augmentation (SimCLR's CIFAR recipe; docs/methods.md)."""

FINETUNE_AUGMENT = AugmentConfig(
    crop_scale=(0.64, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0
)
"""The paper's semi-supervised fine-tuning augmentation: square crops of 64-100% plus flips."""


@dataclass(frozen=True)
class AugmentParams:
    """Every random choice of one augmentation call, one row per image.

    Attributes:
        boxes: ``(n, 4)`` int64 crop boxes ``(top, left, height, width)`` in input pixels.
        flip: ``(n,)`` bool, flip the image horizontally.
        jitter: ``(n,)`` bool, apply the colour jitter.
        factors: ``(n, 4)`` float32 brightness, contrast and saturation factors and hue shift.
        order: ``(n, 4)`` int64, ``order[i, slot]`` is the jitter operation (``BRIGHTNESS``,
            ``CONTRAST``, ``SATURATION`` or ``HUE``) image ``i`` applies in that slot.
        grayscale: ``(n,)`` bool, convert the image to grayscale.
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    grayscale: Tensor


def to_float(images: Tensor) -> Tensor:
    """Scale images to float32 in ``[0, 1]`` (no mean/std normalisation, as in the paper).

    Args:
        images: ``(n, c, h, w)`` uint8 in ``[0, 255]``, or float already in ``[0, 1]``.

    Returns:
        ``(n, c, h, w)`` float32 in ``[0, 1]``.
    """
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    draws = torch.rand(n, generator=generator, device=generator.device)
    return draws.mul_(high - low).add_(low)


def sample_crop_boxes(
    n: int,
    *,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> Tensor:
    """Sample RandomResizedCrop boxes for a batch, all attempts at once.

    Follows torchvision's algorithm per image: up to 10 attempts with area fraction ~ U(scale) and
    log aspect ratio ~ U(log ratio), keeping the first box that fits (position uniform over the
    valid offsets); if none fits, the central crop with the aspect ratio clamped to ``ratio``.
    All 10 attempts are drawn for every image so the number of draws is fixed.

    Args:
        n: Number of boxes.
        height: Input image height.
        width: Input image width.
        scale: Range of the area fraction.
        ratio: Range of the aspect ratio (width / height).
        generator: Source of randomness; boxes are created on its device.

    Returns:
        ``(n, 4)`` int64 boxes ``(top, left, height, width)``.
    """
    device = generator.device
    area = height * width
    shape = (n, _CROP_ATTEMPTS)
    fraction = torch.rand(shape, generator=generator, device=device)
    fraction = fraction.mul_(scale[1] - scale[0]).add_(scale[0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.rand(shape, generator=generator, device=device)
    aspect = aspect.mul_(log_high - log_low).add_(log_low).exp_()
    target = fraction.mul_(area)
    # torch.round rounds half to even, like Python's round() in torchvision's sampler.
    box_w = torch.round(torch.sqrt(target * aspect)).long()
    box_h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    box_w = torch.where(found, box_w.gather(1, first).squeeze(1), fallback_w)
    box_h = torch.where(found, box_h.gather(1, first).squeeze(1), fallback_h)

    offsets = torch.rand((n, 2), generator=generator, device=device)
    # floor(u * count) is uniform over {0, ..., count - 1}; the clamp guards u * count == count.
    top = (offsets[:, 0] * (height - box_h + 1)).long().clamp_max_(height - box_h)
    left = (offsets[:, 1] * (width - box_w + 1)).long().clamp_max_(width - box_w)
    top = torch.where(found, top, (height - box_h) // 2)
    left = torch.where(found, left, (width - box_w) // 2)
    return torch.stack([top, left, box_h, box_w], dim=1)


def sample_params(
    n: int, *, height: int, width: int, config: AugmentConfig, generator: torch.Generator
) -> AugmentParams:
    """Draw every random choice of the pipeline for ``n`` images of size ``(height, width)``.

    Args:
        n: Number of images.
        height: Input image height.
        width: Input image width.
        config: The augmentation parameters.
        generator: Source of randomness; the parameters are created on its device.

    Returns:
        The sampled parameters.
    """
    boxes = sample_crop_boxes(
        n,
        height=height,
        width=width,
        scale=config.crop_scale,
        ratio=config.crop_ratio,
        generator=generator,
    )
    device = generator.device
    flip = torch.rand(n, generator=generator, device=device) < config.flip_p
    jitter = torch.rand(n, generator=generator, device=device) < config.jitter_p
    factors = torch.stack(
        [
            _uniform(n, max(0.0, 1.0 - config.brightness), 1.0 + config.brightness, generator),
            _uniform(n, max(0.0, 1.0 - config.contrast), 1.0 + config.contrast, generator),
            _uniform(n, max(0.0, 1.0 - config.saturation), 1.0 + config.saturation, generator),
            _uniform(n, -config.hue, config.hue, generator),
        ],
        dim=1,
    )
    # The argsort of i.i.d. uniforms is a uniformly random permutation per row (torch.randperm).
    order = torch.rand((n, 4), generator=generator, device=device).argsort(dim=1)
    grayscale = torch.rand(n, generator=generator, device=device) < config.grayscale_p
    return AugmentParams(
        boxes=boxes, flip=flip, jitter=jitter, factors=factors, order=order, grayscale=grayscale
    )


def _resize_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Per-image matrices that crop ``[start, start + length)`` and resize it to ``out_size``.

    The weights are those of antialiased bilinear resizing with half-pixel centres
    (``F.interpolate(mode="bilinear", antialias=True, align_corners=False)``, which is also PIL's
    bilinear filter): output pixel ``k`` is centred at ``start + (k + 0.5) * length / out_size``
    in input coordinates and takes a triangle filter whose half-width is ``max(1, scale)``,
    renormalised over the pixels inside the crop. When upsampling this is plain bilinear
    interpolation with the edge pixels repeated.

    Args:
        start: ``(n,)`` int64 first input pixel of the crop.
        length: ``(n,)`` int64 crop length in input pixels.
        in_size: Input length.
        out_size: Output length.

    Returns:
        ``(n, out_size, in_size)`` float32 weights, each row summing to 1.
    """
    device = start.device
    step = (length.to(torch.float32) / out_size)[:, None, None]
    centre = start[:, None, None] + (torch.arange(out_size, device=device)[:, None] + 0.5) * step
    pixel = torch.arange(in_size, device=device)
    half_width = step.clamp(min=1.0)
    weights = (1.0 - ((pixel + 0.5) - centre).abs() / half_width).clamp_(min=0.0)
    inside = (pixel >= start[:, None, None]) & (pixel < (start + length)[:, None, None])
    weights = weights * inside
    return weights / weights.sum(dim=2, keepdim=True)


def _sample_positions(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """Where each output pixel samples its crop when no crop is longer than the output.

    Then every step is at most one pixel and antialiased bilinear resizing is plain bilinear
    interpolation: output pixel ``k`` reads input position ``start + (k + 0.5) * step - 0.5``,
    ``step = length / out_size``, with the taps that fall outside the crop moved onto its edge
    pixel. Clamping the position to ``[start, start + length - 1]`` does exactly that, so the
    crop and resize become one bilinear sampling of the uncropped image.

    Args:
        start: ``(n,)`` int64 first input pixel of the crop.
        length: ``(n,)`` int64 crop length in input pixels, at most ``out_size``.
        in_size: Input length.
        out_size: Output length, at least ``in_size``.

    Returns:
        ``(n, out_size)`` float32 positions in :func:`torch.nn.functional.grid_sample`'s
        normalised coordinates (``align_corners=False``).
    """
    first = start.to(torch.float32)[:, None]
    last = first + (length.to(torch.float32)[:, None] - 1.0)
    step = length.to(torch.float32)[:, None] / out_size
    pixel = torch.arange(out_size, device=start.device, dtype=torch.float32)
    position = torch.minimum(torch.maximum(first + (pixel + 0.5) * step - 0.5, first), last)
    return position.mul_(2.0 / in_size).add_(1.0 / in_size - 1.0)


def crop_resize_flip(images: Tensor, *, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crop each image to its box, resize it to ``(size, size)`` and optionally flip it.

    When the images are no larger than the output (CIFAR 32 -> 32, Fashion-MNIST 28 -> 32), every
    crop is enlarged and the three steps are one batched bilinear sampling (``grid_sample``) at
    per-image positions, the flip being the column positions in reverse. Otherwise cropping and
    antialiased resizing along each axis is a linear map, and the step is
    ``rows @ image @ columns^T`` with per-image matrices, the channels folded into the matrix
    products (``(size, h) @ (h, c w)``, then ``(c size, w) @ (w, size)``).

    Args:
        images: ``(n, c, h, w)`` float images.
        boxes: ``(n, 4)`` int64 ``(top, left, height, width)``.
        flip: ``(n,)`` bool.
        size: Output side length.

    Returns:
        ``(n, c, size, size)`` float32 in ``[0, 1]``.
    """
    n, channels, height, width = images.shape
    top, left, box_h, box_w = boxes.unbind(dim=1)
    # Autocast would run these products in half precision; the output contract is float32.
    with torch.autocast(device_type=images.device.type, enabled=False):
        images = images.to(torch.float32)
        if height <= size and width <= size:
            rows = _sample_positions(top, box_h, height, size)
            columns = _sample_positions(left, box_w, width, size)
            columns = torch.where(flip[:, None], columns.flip(1), columns)
            grid = torch.stack(
                [columns[:, None, :].expand(n, size, size), rows[:, :, None].expand(n, size, size)],
                dim=3,
            )
            out = F.grid_sample(
                images, grid, mode="bilinear", padding_mode="border", align_corners=False
            )
            return out.clamp_(0.0, 1.0)
        row_weights = _resize_weights(top, box_h, height, size)
        column_weights = _resize_weights(left, box_w, width, size)
        column_weights = torch.where(flip[:, None, None], column_weights.flip(1), column_weights)
        stacked = images.transpose(1, 2).reshape(n, height, channels * width)
        out = torch.bmm(row_weights, stacked).reshape(n, size * channels, width)
        out = torch.bmm(out, column_weights.transpose(1, 2))
    return out.reshape(n, size, channels, size).transpose(1, 2).contiguous().clamp_(0.0, 1.0)


def grayscale(images: Tensor) -> Tensor:
    """Luminance ``0.299 R + 0.587 G + 0.114 B``; single-channel images are returned as they are.

    Args:
        images: ``(n, c, h, w)`` float with ``c`` 1 or 3.

    Returns:
        ``(n, 1, h, w)`` float.
    """
    if images.shape[1] == 1:
        return images
    red, green, blue = images.unbind(dim=1)
    return (_LUMA[0] * red + _LUMA[1] * green + _LUMA[2] * blue).unsqueeze(1)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue in HSV space by ``shift`` turns, keeping saturation and value.

    Computes the HSV hue as colorsys and torchvision do (ties broken red, then green, then blue)
    and converts back with the branch-free formula ``c_n = V - C * clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + 6 H) mod 6`` for ``n = 5, 3, 1`` (red, green, blue), ``C = max - min`` the chroma.
    The three ramps are computed as distances (below), in place.

    Args:
        images: ``(n, 3, h, w)`` float in ``[0, 1]``.
        shift: ``(n,)`` hue shift in turns.

    Returns:
        ``(n, 3, h, w)`` float.
    """
    red, green, blue = images.unbind(dim=1)
    value = images.amax(dim=1)
    low = images.amin(dim=1)
    chroma = value - low
    # A grey pixel (chroma 0) has all three differences 0, so any positive divisor gives hue 0.
    safe = chroma.clamp_min(torch.finfo(chroma.dtype).tiny)
    # Which channel holds the maximum, as 0/1 weights: lerp with them selects exactly and runs
    # several times faster on a CPU than torch.where with a boolean mask.
    red_max = (value == red).to(images.dtype)
    green_max = (value == green).to(images.dtype)
    not_red = torch.lerp(
        (red - green).add_(safe, alpha=4.0), (blue - red).add_(safe, alpha=2.0), green_max
    )
    sixths = torch.lerp(not_red, green - blue, red_max)
    hue = sixths.div_(safe).add_(6.0 * shift[:, None, None]).remainder_(6.0)
    # With k = (n + 6 H) mod 6, clamp(min(k, 4 - k), 0, 1) = 1 - clamp(d_n - 1, 0, 1), d_n the
    # distance from the shifted hue to the nearest of n's points (red 3; green -1 and 5; blue 1
    # and 7), so c_n = (min - C) + C clamp(d_n, 1, 2): no remainder per channel.
    out = torch.empty_like(images)
    torch.sub(hue, 3.0, out=out[:, 0]).abs_()
    torch.sub(hue, 2.0, out=out[:, 1]).abs_().sub_(3.0).abs_()
    torch.sub(hue, 4.0, out=out[:, 2]).abs_().sub_(3.0).abs_()
    return out.clamp_(1.0, 2.0).mul_(chroma.unsqueeze(1)).add_((low - chroma).unsqueeze(1))


def color_jitter(
    images: Tensor, *, factors: Tensor, order: Tensor, active: Tensor, include_hue: bool = True
) -> Tensor:
    """ColorJitter with a per-image random order of its four operations, batched.

    For each of the four slots, every image applies the one operation its order puts there:
    brightness ``f x``, contrast ``f x + (1 - f) mean(gray(x))``, saturation
    ``f x + (1 - f) gray(x)`` or a hue shift; the result is clamped to ``[0, 1]`` after each, as
    torchvision does. Brightness, contrast and saturation are each a per-image colour matrix and
    bias: ``f I`` for brightness, ``f I`` and the bias ``(1 - f) mean(gray(x))`` for contrast,
    ``f I + (1 - f) 1 w^T`` (``w`` the luminance weights) for saturation, and the identity for
    an image whose slot holds the hue or that is not jittered; so one batched matrix product
    applies whichever of the three every image has in a slot. Hue shifts run only on the images
    that apply them in that slot. Single-channel images skip saturation and hue.

    Args:
        images: ``(n, c, h, w)`` float in ``[0, 1]``, ``c`` 1 or 3.
        factors: ``(n, 4)`` brightness, contrast, saturation factors and hue shift.
        order: ``(n, 4)`` int64 operation per slot (``BRIGHTNESS``, ``CONTRAST``, ...).
        active: ``(n,)`` bool; inactive images are returned unchanged.
        include_hue: Whether to compute hue shifts at all (``False`` when the hue range is 0,
            which saves the most expensive operation).

    Returns:
        ``(n, c, h, w)`` float in ``[0, 1]``.
    """
    n, channels, height, width = images.shape
    color = channels == 3
    device = images.device
    op = torch.where(active[:, None], order, -1)
    chosen = factors.gather(1, op.clamp(min=0)).to(images.dtype)
    is_scaled = (op == BRIGHTNESS) | (op == CONTRAST)
    is_saturation = (op == SATURATION) if color else torch.zeros_like(is_scaled)
    scale = torch.where(is_scaled | is_saturation, chosen, 1.0)
    mean_weight = torch.where(op == CONTRAST, 1.0 - chosen, 0.0)
    gray_weight = torch.where(is_saturation, 1.0 - chosen, 0.0)
    luma = torch.tensor(_LUMA if color else (1.0,), device=device, dtype=images.dtype)
    # (n, 4, c, c): scale * I + gray_weight * 1 luma^T, one colour matrix per image and slot.
    matrices = scale[:, :, None, None] * torch.eye(channels, device=device, dtype=images.dtype)
    matrices = matrices + gray_weight[:, :, None, None] * luma.expand(channels, channels)
    hue = factors[:, HUE]
    out = images.reshape(n, channels, height * width)
    # Autocast would run the colour products in half precision; the output contract is float32.
    with torch.autocast(device_type=device.type, enabled=False):
        for slot in range(4):
            gray_mean = out.mean(dim=2) @ luma
            bias = (mean_weight[:, slot] * gray_mean)[:, None, None]
            # bmm, then the bias in place: baddbmm would first copy the broadcast bias into a
            # whole batch-sized tensor, which costs more than the product itself on a CPU.
            out = torch.bmm(matrices[:, slot], out).add_(bias).clamp_(0.0, 1.0)
            if color and include_hue:
                # The hue shift is the costly operation, so it runs only on the images that apply
                # it in this slot (the index costs one host sync per slot on a GPU, far less than
                # computing the shift four times for the whole batch).
                index = (op[:, slot] == HUE).nonzero().squeeze(1)
                picked = out.index_select(0, index).view(-1, channels, height, width)
                shifted = adjust_hue(picked, hue.index_select(0, index)).clamp_(0.0, 1.0)
                out.index_copy_(0, index, shifted.view(-1, channels, height * width))
    return out.view(n, channels, height, width)


def apply_params(images: Tensor, params: AugmentParams, config: AugmentConfig) -> Tensor:
    """Apply sampled augmentation parameters to a batch.

    Args:
        images: ``(n, c, h, w)`` uint8 or float in ``[0, 1]``, ``c`` 1 or 3.
        params: Parameters for these ``n`` images, on the images' device.
        config: The configuration the parameters were sampled from (its zero probabilities and
            ranges let whole stages be skipped).

    Returns:
        ``(n, c, size, size)`` float32 in ``[0, 1]``.
    """
    out = crop_resize_flip(to_float(images), boxes=params.boxes, flip=params.flip, size=config.size)
    if config.jitter_p > 0.0:
        out = color_jitter(
            out,
            factors=params.factors,
            order=params.order,
            active=params.jitter,
            include_hue=config.hue > 0.0,
        )
    if config.grayscale_p > 0.0 and out.shape[1] == 3:
        # Only the chosen images are converted (a broadcasting where over the whole batch costs
        # several times more on a CPU); ``out`` is this function's own tensor.
        index = params.grayscale.nonzero().squeeze(1)
        gray = grayscale(out.index_select(0, index))
        out.index_copy_(0, index, gray.expand(-1, out.shape[1], -1, -1))
    return out


def _check_images(images: Tensor, generator: torch.Generator) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(
            f"images must have shape (n, c, h, w) with 1 or 3 channels, got {tuple(images.shape)}."
        )
    if images.device.type != generator.device.type:
        raise DataError(
            f"images are on {images.device} but the generator is on {generator.device}; "
            "create the generator on the images' device."
        )


def augment(images: Tensor, config: AugmentConfig, *, generator: torch.Generator) -> Tensor:
    """Augment a batch of images, each with its own random draws.

    Args:
        images: ``(n, c, h, w)`` uint8 or float in ``[0, 1]``, ``c`` 1 or 3, on any device.
        config: The augmentation parameters.
        generator: Source of all randomness, on the images' device; the same generator state
            gives the same output.

    Returns:
        ``(n, c, size, size)`` float32 in ``[0, 1]``.

    Raises:
        DataError: If the images are not 4-D with 1 or 3 channels, or not on the generator's
            device.
    """
    _check_images(images, generator)
    params = sample_params(
        images.shape[0],
        height=images.shape[2],
        width=images.shape[3],
        config=config,
        generator=generator,
    )
    return apply_params(images, params, config)


def two_views(
    images: Tensor, config: AugmentConfig, *, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Two independent augmentations of the same batch (one batched call over ``2 n`` images).

    Args:
        images: ``(n, c, h, w)`` uint8 or float in ``[0, 1]``, ``c`` 1 or 3, on any device.
        config: The augmentation parameters.
        generator: Source of all randomness, on the images' device.

    Returns:
        Two ``(n, c, size, size)`` float32 tensors in ``[0, 1]``.

    Raises:
        DataError: If the images are not 4-D with 1 or 3 channels, or not on the generator's
            device.
    """
    views = augment(torch.cat([images, images]), config, generator=generator)
    first, second = views.chunk(2)
    return first, second
