"""Models: an encoder (backbone) followed by the SSD projector.

``ENCODERS`` names the backbones a config may choose; ``build_model`` assembles an
:class:`SSLModel` from a name and sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor, nn

from fedssd.errors import ConfigError
from fedssd.models.backbones import (
    RESNETS,
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNetCifarThin,
    SmallCNN,
    resnet8,
    resnet20,
)
from fedssd.models.heads import mlp_projector

__all__ = [
    "ENCODERS",
    "RESNETS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "ResNetCifarThin",
    "SSLModel",
    "SmallCNN",
    "build_model",
    "mlp_projector",
]

# resnet18/34/50: the CIFAR stem (the SSD paper's ResNet-18 for 32x32 images);
# resnet18/34/50_imagenet: the ImageNet stem, for larger images and ImageNet-pretrained weights;
# resnet8/20: the thin three-stage CIFAR ResNets, cheaper than ResNet-18 at any width.
ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet8": resnet8,
    "resnet20": resnet20,
    **{
        name: partial(ResNet, block=block, depths=depths, stem="cifar")
        for name, (block, depths) in RESNETS.items()
    },
    **{
        f"{name}_imagenet": partial(ResNet, block=block, depths=depths, stem="imagenet")
        for name, (block, depths) in RESNETS.items()
    },
}


class SSLModel(nn.Module):
    """Encoder ``f`` and projector ``g``: ``h = f(x)``, ``z_raw = g(h)`` (Fang et al., ICCV 2025).

    Federated averaging covers both parts, so they live in one module whose ``state_dict`` is
    what the server aggregates.

    Args:
        encoder: Maps ``(batch, channels, height, width)`` to ``(batch, feature_dim)``.
        projector: Maps ``(batch, feature_dim)`` to ``(batch, embed_dim)``.
        feature_dim: Output size of the encoder.
        embed_dim: Output size of the projector.
    """

    def __init__(
        self, *, encoder: nn.Module, projector: nn.Module, feature_dim: int, embed_dim: int
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.feature_dim = feature_dim
        self.embed_dim = embed_dim
        # A method's extra parts (predictor, centroids), attached by name; empty for most methods.
        self.extras = nn.ModuleDict()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encode and project a batch.

        Args:
            x: ``(batch, channels, height, width)`` images.

        Returns:
            ``h`` of shape ``(batch, feature_dim)`` and the un-normalised ``z_raw`` of shape
            ``(batch, embed_dim)``.
        """
        h = self.encoder(x)
        return h, self.projector(h)


def build_model(
    *,
    encoder: str,
    in_channels: int = 3,
    width: int | None = None,
    projector_hidden: int = 2048,
    projector_out: int | None = 512,
) -> SSLModel:
    """Build an encoder by name with the SSD projector on top.

    Args:
        encoder: A key of ``ENCODERS`` (``"resnet18"``, ``"resnet50_imagenet"``, ``"resnet8"``,
            ``"small_cnn"``).
        in_channels: Image channels.
        width: First-stage width of the encoder; ``None`` keeps the encoder's default
            (64 for ResNet-18/34/50, 16 for ResNet-8 and ResNet-20, 32 for the small CNN).
        projector_hidden: Hidden width of the projector.
        projector_out: Embedding dimension; ``None`` means the encoder's feature dimension.

    Returns:
        The model, with PyTorch's default initialisation (seed the global RNG to fix it).

    Raises:
        ConfigError: If ``encoder`` is not a known name.
    """
    if encoder not in ENCODERS:
        raise ConfigError(
            f"Unknown encoder {encoder!r}; choose one of {', '.join(sorted(ENCODERS))}."
        )
    sizes = {} if width is None else {"width": width}
    backbone = ENCODERS[encoder](in_channels=in_channels, **sizes)
    feature_dim = backbone.feature_dim
    if not isinstance(feature_dim, int):
        raise TypeError(f"encoder {encoder!r} must set an integer attribute feature_dim.")
    embed_dim = feature_dim if projector_out is None else projector_out
    return SSLModel(
        encoder=backbone,
        projector=mlp_projector(feature_dim, hidden_dim=projector_hidden, out_dim=embed_dim),
        feature_dim=feature_dim,
        embed_dim=embed_dim,
    )
