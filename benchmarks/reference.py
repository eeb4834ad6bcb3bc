"""The authors' way of feeding the model, rebuilt in torch: per-image augmentation in a DataLoader.

The released SSD code augments one PIL image at a time inside a ``torch.utils.data.Dataset``
(``RandomResizedCrop -> RandomHorizontalFlip -> RandomApply(ColorJitter) -> RandomGrayscale``)
and lets a ``DataLoader`` collate the two views. This module does the same per-image work with
torch operations on ``(c, h, w)`` tensors (no PIL or torchvision), drawing every random choice per
image the way torchvision does. It is written independently of :mod:`fedssd.data.augment` (its own
crop sampler, its own HSV conversion), so it serves two purposes: the speed reference of
``benchmarks/bench.py`` and the distribution reference of
``tests/data/test_augment_distribution.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from fedssd.data.augment import AugmentConfig

_LUMA = (0.299, 0.587, 0.114)
_OPERATIONS = ("brightness", "contrast", "saturation", "hue")


@dataclass(frozen=True)
class SampleParams:
    """The random choices made for one image.

    Attributes:
        box: ``(top, left, height, width)`` of the crop in input pixels.
        flip: Whether the image is flipped horizontally.
        jitter: Whether the colour jitter is applied.
        factors: Brightness, contrast and saturation factors and the hue shift.
        order: The jitter operations' order (indices into brightness, contrast, saturation, hue).
        grayscale: Whether the image is converted to grayscale.
    """

    box: tuple[int, int, int, int]
    flip: bool
    jitter: bool
    factors: tuple[float, float, float, float]
    order: tuple[int, ...]
    grayscale: bool


def _uniform(low: float, high: float, rng: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=rng))


def _chance(p: float, rng: torch.Generator) -> bool:
    return float(torch.rand(1, generator=rng)) < p


def sample_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: torch.Generator,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box for one image: up to 10 tries, then a central crop.

    Args:
        height: Image height.
        width: Image width.
        scale: Range of the crop's area fraction.
        ratio: Range of its aspect ratio (width / height), drawn log-uniformly.
        rng: Source of randomness.

    Returns:
        ``(top, left, height, width)``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], rng)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], rng))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=rng))
            left = int(torch.randint(0, width - w + 1, (1,), generator=rng))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_image_params(
    height: int, width: int, config: AugmentConfig, rng: torch.Generator
) -> SampleParams:
    """Every random choice for one image, drawn one at a time as torchvision's transforms do."""
    box = sample_box(height, width, config.crop_scale, config.crop_ratio, rng)
    flip = _chance(config.flip_p, rng)
    jitter = _chance(config.jitter_p, rng)
    order = tuple(int(i) for i in torch.randperm(4, generator=rng))
    factors = (
        _uniform(max(0.0, 1 - config.brightness), 1 + config.brightness, rng),
        _uniform(max(0.0, 1 - config.contrast), 1 + config.contrast, rng),
        _uniform(max(0.0, 1 - config.saturation), 1 + config.saturation, rng),
        _uniform(-config.hue, config.hue, rng),
    )
    grayscale = _chance(config.grayscale_p, rng)
    return SampleParams(
        box=box, flip=flip, jitter=jitter, factors=factors, order=order, grayscale=grayscale
    )


def _gray(image: Tensor) -> Tensor:
    """``(1, h, w)`` luminance of a ``(3, h, w)`` image."""
    return (_LUMA[0] * image[0] + _LUMA[1] * image[1] + _LUMA[2] * image[2]).unsqueeze(0)


def shift_hue(image: Tensor, shift: float) -> Tensor:
    """Rotate the hue of one ``(3, h, w)`` image by ``shift`` turns (colorsys's HSV, sector form).

    Args:
        image: ``(3, h, w)`` float in ``[0, 1]``.
        shift: Hue shift in turns.

    Returns:
        ``(3, h, w)`` float.
    """
    red, green, blue = image
    value, _ = image.max(dim=0)
    low, _ = image.min(dim=0)
    spread = value - low
    saturation = torch.where(value > 0, spread / value.clamp(min=1e-12), torch.zeros_like(value))
    denom = spread.clamp(min=1e-12)
    rc, gc, bc = ((value - c) / denom for c in (red, green, blue))
    hue = torch.where(red == value, bc - gc, torch.where(green == value, 2 + rc - bc, 4 + gc - rc))
    hue = torch.where(spread > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift, 1.0)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    p = value * (1 - saturation)
    q = value * (1 - saturation * frac)
    t = value * (1 - saturation * (1 - frac))
    sector = sector.long() % 6
    table = torch.stack(
        [
            torch.stack([value, t, p]),
            torch.stack([q, value, p]),
            torch.stack([p, value, t]),
            torch.stack([p, q, value]),
            torch.stack([t, p, value]),
            torch.stack([value, p, q]),
        ]
    )
    index = sector[None, None].expand(1, 3, *sector.shape)
    return table.gather(0, index)[0]


def apply_image_params(image: Tensor, params: SampleParams, config: AugmentConfig) -> Tensor:
    """Augment one image with the given choices.

    Args:
        image: ``(c, h, w)`` uint8, ``c`` 1 or 3.
        params: The choices for this image.
        config: The pipeline's configuration (output size).

    Returns:
        ``(c, size, size)`` float32 in ``[0, 1]``.
    """
    top, left, h, w = params.box
    crop = image[:, top : top + h, left : left + w].to(torch.float32).div(255.0)
    out = F.interpolate(
        crop[None], size=(config.size, config.size), mode="bilinear", antialias=True
    )[0].clamp(0.0, 1.0)
    if params.flip:
        out = out.flip(-1)
    color = out.shape[0] == 3
    if params.jitter:
        for op in params.order:
            factor = params.factors[op]
            name = _OPERATIONS[op]
            if name == "brightness":
                out = out * factor
            elif name == "contrast":
                mean = (_gray(out) if color else out).mean()
                out = factor * out + (1 - factor) * mean
            elif name == "saturation" and color:
                out = factor * out + (1 - factor) * _gray(out)
            elif name == "hue" and color:
                out = shift_hue(out, factor)
            out = out.clamp(0.0, 1.0)
    if params.grayscale and color:
        out = _gray(out).expand(3, -1, -1).contiguous()
    return out


class TwoViewDataset(Dataset[tuple[Tensor, Tensor]]):
    """A dataset returning two independently augmented views of each image (the released code).

    Args:
        images: ``(n, c, h, w)`` uint8 images.
        config: The augmentation.
        seed: Seed of the per-image draws (each DataLoader worker reseeds from it).
    """

    def __init__(self, images: Tensor, config: AugmentConfig, seed: int) -> None:
        self.images = images
        self.config = config
        self.seed = seed
        self.rng = torch.Generator().manual_seed(seed)

    def reseed(self, offset: int) -> None:
        """Give a DataLoader worker its own stream."""
        self.rng = torch.Generator().manual_seed(self.seed + 1000003 * (offset + 1))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def view(self, index: int) -> Tensor:
        """One augmented ``(c, size, size)`` view of image ``index``."""
        image = self.images[index]
        params = sample_image_params(image.shape[1], image.shape[2], self.config, self.rng)
        return apply_image_params(image, params, self.config)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.view(index), self.view(index)
