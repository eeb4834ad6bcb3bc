"""Image encoders: the paper's CIFAR ResNet-18, the thin CIFAR ResNets of He et al. (ResNet-8
and ResNet-20) and a small CNN that trains quickly on a CPU.

All map ``(batch, in_channels, height, width)`` images to ``(batch, feature_dim)`` features by
global average pooling, have no classifier, and keep PyTorch's default initialisation (Kaiming
uniform for convolutions and linear layers, BatchNorm weight 1 and bias 0). They use only
convolutions, BatchNorm, ReLU, max-pooling and means, so channels_last inputs and bf16 autocast
work unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn


def _conv3x3(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Conv2d:
    # No bias: every convolution here is followed by BatchNorm, which has its own shift.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm and an identity or 1x1 shortcut.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (and of the projection shortcut).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride=stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, h, w)`` to ``(batch, out_channels, h / s, w / s)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        summed: Tensor = self.relu(out + self.shortcut(x))
        return summed


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 images (as in the SSD paper, Fang et al., ICCV 2025), without the
    classifier.

    A 3x3 stride-1 stem convolution with no max-pool keeps the full resolution for small images;
    four stages of two basic blocks with widths ``w, 2w, 4w, 8w`` and strides ``1, 2, 2, 2``;
    global average pooling gives ``feature_dim = 8 w`` (512 for the default ``w = 64``, about
    11.17M parameters).

    Args:
        in_channels: Image channels (3 for CIFAR, 1 for Fashion-MNIST).
        width: Channels of the first stage.
    """

    def __init__(self, *, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.feature_dim = 8 * width
        self.stem = nn.Sequential(
            _conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        channels = width
        for index, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**index
            stages.append(
                nn.Sequential(
                    BasicBlock(channels, out_channels, stride=stride),
                    BasicBlock(out_channels, out_channels),
                )
            )
            channels = out_channels
        self.stages = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, in_channels, h, w)`` images to ``(batch, feature_dim)`` features."""
        maps: Tensor = self.stages(self.stem(x))
        return maps.mean(dim=(2, 3))


class ResNetCifarThin(nn.Module):
    """The thin CIFAR ResNets of He et al. (CVPR 2016, section 4.2), depth ``6 n + 2``, without
    the classifier.

    A 3x3 stride-1 stem convolution, then three stages of ``n`` basic blocks with widths
    ``w, 2w, 4w`` and strides ``1, 2, 2`` (``w = 16`` in the paper), and global average pooling:
    ``feature_dim = 4 w``. ``n = 1`` is ResNet-8, ``n = 3`` ResNet-20 (about 0.27M parameters
    at ``w = 16``). Where the width changes, the shortcut is a 1x1 convolution with BatchNorm
    (the paper's option B), as in :class:`ResNet18Cifar`, rather than option A's zero-padded
    identity.

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
