"""Image encoders: ResNets (He et al., CVPR 2016) with a CIFAR or an ImageNet stem, the thin
CIFAR ResNets of the same paper (ResNet-8 and ResNet-20), and a small CNN that trains quickly on
a CPU.

All map ``(batch, in_channels, height, width)`` images to ``(batch, feature_dim)`` features by
global average pooling, have no classifier, and keep PyTorch's default initialisation (Kaiming
uniform for convolutions and linear layers, BatchNorm weight 1 and bias 0). They use only
convolutions, BatchNorm, ReLU, max-pooling and means, so channels_last inputs and bf16 autocast
work unchanged, and any image side works (the pooled feature map shrinks with the image).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

Stem = Literal["cifar", "imagenet"]


def _conv3x3(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution here is followed by BatchNorm, which has its own shift.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when the shapes agree, else the paper's projection shortcut (option B):
    a strided 1x1 convolution and BatchNorm."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        _conv1x1(in_channels, out_channels, stride=stride), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm and an identity or 1x1 shortcut.

    Args:
        in_channels: Input channels.
        planes: Output channels (``expansion = 1``).
        stride: Stride of the first convolution (and of the projection shortcut).
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride=stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, h, w)`` to ``(batch, planes, h / s, w / s)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        summed: Tensor = self.relu(out + self.shortcut(x))
        return summed


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 reduce, 3x3, 1x1 expand (to ``4 planes``), each with
    BatchNorm, plus an identity or 1x1 shortcut.

    The stride sits on the 3x3 convolution, not on the first 1x1 as in the paper's table: the
    variant torchvision and timm train (often called ResNet v1.5), so their ImageNet weights
    compute the same function here. Both place the same weight shapes.

    Args:
        in_channels: Input channels.
        planes: Channels of the 3x3 convolution; the block outputs ``4 planes``.
        stride: Stride of the 3x3 convolution (and of the projection shortcut).
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride=stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, h, w)`` to ``(batch, 4 planes, h / s, w / s)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        summed: Tensor = self.relu(out + self.shortcut(x))
        return summed


class ResNet(nn.Module):
    """A ResNet without the classifier (He et al., CVPR 2016, Table 1).

    Four stages of ``depths`` blocks with ``w, 2w, 4w, 8w`` planes and strides ``1, 2, 2, 2``,
    then global average pooling: ``feature_dim = 8 w`` for basic blocks (512 for ``w = 64``) and
    ``32 w`` for bottlenecks (2048). The stem is either

    - ``cifar``: a 3x3 stride-1 convolution and no max-pool, which keeps the full resolution of
      32x32 images (the SSD paper's ResNet-18, Fang et al., ICCV 2025); its cost grows with the
      image area at full resolution, so it suits small images;
    - ``imagenet``: the paper's 7x7 stride-2 convolution and 3x3 stride-2 max-pool, which reduce
      the image 4 times per side before the first stage (the stem of ImageNet-pretrained
      weights; 224x224 images reach the pool at 7x7).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        depths: Blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18, ``(3, 4, 6, 3)`` for 34/50.
        stem: ``cifar`` or ``imagenet``.
        in_channels: Image channels (3 for photos, 1 for Fashion-MNIST).
        width: Channels of the stem and planes of the first stage.
    """

    def __init__(
        self,
        *,
        block: type[BasicBlock | Bottleneck],
        depths: tuple[int, int, int, int],
        stem: Stem,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.feature_dim = 8 * width * block.expansion
        if stem == "cifar":
            self.stem = nn.Sequential(
                _conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        stages: list[nn.Module] = []
        channels = width
        for index, (depth, stride) in enumerate(zip(depths, (1, 2, 2, 2), strict=True)):
            planes = width * 2**index
            blocks: list[nn.Module] = []
            for position in range(depth):
                blocks.append(block(channels, planes, stride=stride if position == 0 else 1))
                channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, h, w)`` images to ``(batch, feature_dim)`` features."""
        maps: Tensor = self.stages(self.stem(x))
        return maps.mean(dim=(2, 3))


# Block type and blocks per stage of each depth (He et al., CVPR 2016, Table 1).
RESNETS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNetCifarThin(nn.Module):
    """The thin CIFAR ResNets of He et al. (CVPR 2016, section 4.2), depth ``6 n + 2``, without
    the classifier.

    A 3x3 stride-1 stem convolution, then three stages of ``n`` basic blocks with widths
    ``w, 2w, 4w`` and strides ``1, 2, 2`` (``w = 16`` in the paper), and global average pooling:
    ``feature_dim = 4 w``. ``n = 1`` is ResNet-8, ``n = 3`` ResNet-20 (about 0.27M parameters
    at ``w = 16``). Where the width changes, the shortcut is a 1x1 convolution with BatchNorm
    (the paper's option B), as in :class:`ResNet`, rather than option A's zero-padded identity.

    Args:
        in_channels: Image channels.
        width: Channels of the first stage.
        blocks: Basic blocks per stage (``n``).
    """

    def __init__(self, *, in_channels: int = 3, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.feature_dim = 4 * width
        self.stem = nn.Sequential(
            _conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        channels = width
        for index, stride in enumerate((1, 2, 2)):
            out_channels = width * 2**index
            layers = [BasicBlock(channels, out_channels, stride=stride)]
            layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            channels = out_channels
        self.stages = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, h, w)`` images to ``(batch, feature_dim)`` features."""
        maps: Tensor = self.stages(self.stem(x))
        return maps.mean(dim=(2, 3))


def resnet8(*, in_channels: int = 3, width: int = 16) -> ResNetCifarThin:
    """ResNet-8: one basic block per stage (see :class:`ResNetCifarThin`)."""
    return ResNetCifarThin(in_channels=in_channels, width=width, blocks=1)


def resnet20(*, in_channels: int = 3, width: int = 16) -> ResNetCifarThin:
    """ResNet-20: three basic blocks per stage (see :class:`ResNetCifarThin`)."""
    return ResNetCifarThin(in_channels=in_channels, width=width, blocks=3)


class SmallCNN(nn.Module):
    """Three conv blocks (3x3 conv, BatchNorm, ReLU), max-pool 2 after the first two, average pool.

    Widths ``w, 2w, 4w`` give ``feature_dim = 4 w``. Meant for quick CPU runs (Fashion-MNIST
    demos and tests), not for reproducing the paper's numbers.

    Args:
        in_channels: Image channels.
        width: Channels of the first block.
    """

    def __init__(self, *, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.feature_dim = 4 * width
        self.features = nn.Sequential(
            _conv3x3(in_channels, width),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            _conv3x3(width, 2 * width),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            _conv3x3(2 * width, 4 * width),
            nn.BatchNorm2d(4 * width),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, h, w)`` images to ``(batch, feature_dim)`` features."""
        maps: Tensor = self.features(x)
        return maps.mean(dim=(2, 3))
