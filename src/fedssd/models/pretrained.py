"""ImageNet-pretrained ResNet weights in torchvision's and timm's naming, read into fedssd's.

torchvision and timm name a ResNet's tensors alike: ``conv1`` and ``bn1`` (the stem),
``layer1`` .. ``layer4`` of blocks ``0, 1, ...`` with ``conv1/bn1 .. conv3/bn3`` and a
``downsample.0`` (1x1 convolution) / ``downsample.1`` (BatchNorm) shortcut, and the classifier
``fc``. fedssd's :class:`~fedssd.models.backbones.ResNet` holds the same tensors as ``stem.0``,
``stem.1``, ``stages.0`` .. ``stages.3`` and ``shortcut.0/1``, and has no classifier.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from fedssd.models.backbones import RESNETS, Bottleneck

_STEM = {"conv1": "stem.0", "bn1": "stem.1"}
_STAGE = re.compile(r"layer([1-4])\.(\d+)\.(.+)")
_OUR_STAGE = re.compile(r"stages\.([0-3])\.(\d+)\.(.+)")
CLASSIFIER = "fc."


def fedssd_key(key: str) -> str | None:
    """fedssd's encoder key for a torchvision/timm ResNet key, or None for a key of neither
    a stem nor a stage (the classifier ``fc.*`` included).

    ``conv1.weight -> stem.0.weight``, ``layer2.0.downsample.1.running_mean ->
    stages.1.0.shortcut.1.running_mean``.
    """
    module, _, rest = key.partition(".")
    if module in _STEM and rest:
        return f"{_STEM[module]}.{rest}"
    match = _STAGE.fullmatch(key)
    if match is None:
        return None
    stage, block, rest = match.groups()
    if rest.startswith("downsample."):
        rest = "shortcut." + rest.removeprefix("downsample.")
    return f"stages.{int(stage) - 1}.{block}.{rest}"


def torchvision_key(key: str) -> str:
    """The torchvision/timm name of a fedssd ResNet encoder key (the inverse of
    :func:`fedssd_key`); a key of no ResNet stays as it is."""
    for theirs, ours in _STEM.items():
        if key.startswith(f"{ours}."):
            return theirs + key.removeprefix(ours)
    match = _OUR_STAGE.fullmatch(key)
    if match is None:
        return key
    stage, block, tail = match.groups()
    if tail.startswith("shortcut."):
        tail = "downsample." + tail.removeprefix("shortcut.")
    return f"layer{int(stage) + 1}.{block}.{tail}"


@dataclass(frozen=True)
class ResNetShape:
    """What a ResNet state dict is: the fedssd encoder name, its width and image channels."""

    encoder: str
    width: int
    in_channels: int


def identify(state: Mapping[str, Tensor]) -> ResNetShape | None:
    """The fedssd encoder a torchvision/timm-named ResNet state dict fits, or None when it is
    no ResNet-18, 34 or 50 with a 3x3 (CIFAR) or 7x7 (ImageNet) stem."""
    stem = state.get("conv1.weight")
    if stem is None or stem.dim() != 4 or stem.shape[-1] not in (3, 7):
        return None
    blocks: list[set[int]] = [set(), set(), set(), set()]
    bottleneck = False
    for key in state:
        match = _STAGE.fullmatch(key)
        if match is not None:
            blocks[int(match.group(1)) - 1].add(int(match.group(2)))
            bottleneck = bottleneck or match.group(3).startswith("conv3.")
    depths = tuple(len(found) for found in blocks)
    suffix = "_imagenet" if stem.shape[-1] == 7 else ""
    for name, (block, wanted) in RESNETS.items():
        if wanted == depths and (block is Bottleneck) == bottleneck:
            return ResNetShape(f"{name}{suffix}", int(stem.shape[0]), int(stem.shape[1]))
    return None


def to_fedssd(state: Mapping[str, Tensor]) -> tuple[dict[str, str], list[str]]:
    """Map every key of a torchvision/timm ResNet state dict.

    Returns:
        fedssd encoder key -> the file's key, for every key but the classifier's; and the keys
        that are neither a ResNet's nor its classifier's, both in the file's order.
    """
    mapped: dict[str, str] = {}
    unknown: list[str] = []
    for key in state:
        if key.startswith(CLASSIFIER):
            continue
        ours = fedssd_key(key)
        if ours is None:
            unknown.append(key)
        else:
            mapped[ours] = key
    return mapped, unknown
