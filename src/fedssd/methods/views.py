"""What several methods share: both augmented views through the model, the losses in full
precision, and the alignment and uniformity objective (Wang & Isola, ICML 2020) that FedAlignUniform
optimises and SSD, HSD, FedU2, FedDecorr and FedX build on.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fedssd import losses
from fedssd.methods.protocol import require


@dataclasses.dataclass(frozen=True)
class AlignUniformOptions:
    """Options of FedAlignUniform.

    Attributes:
        uniformity_weight: Weight beta of the uniformity term (1.0, as in the SSD paper).
        uniformity_t: Temperature t of the uniformity term (2, as in the SSD paper).
    """

    uniformity_weight: float = 1.0
    uniformity_t: float = 2.0

    def __post_init__(self) -> None:
        require(self.uniformity_weight >= 0, "method.uniformity_weight must be >= 0")
        require(self.uniformity_t > 0, "method.uniformity_t must be > 0")


@dataclasses.dataclass(frozen=True)
class ViewOutputs:
    """Model outputs for both views: raw h, raw z and unit-norm z, each ``(batch, dim)``."""

    h: tuple[torch.Tensor, torch.Tensor]
    z_raw: tuple[torch.Tensor, torch.Tensor]
    z: tuple[torch.Tensor, torch.Tensor]


def forward_views(model: nn.Module, view1: torch.Tensor, view2: torch.Tensor) -> ViewOutputs:
    """Run both views through the model separately (BatchNorm statistics per view).

    The outputs are float32 whatever the autocast precision, so that the losses, computed under
    :func:`full_precision`, do not lose the small distances uniformity depends on.
    """
    h1, z1 = (t.float() for t in model(view1))
    h2, z2 = (t.float() for t in model(view2))
    return ViewOutputs(h=(h1, h2), z_raw=(z1, z2), z=(losses.normalize(z1), losses.normalize(z2)))


def full_precision(device: torch.device) -> torch.autocast:
    """A context in which mixed-precision autocast is off (loss terms run in float32)."""
    return torch.autocast(device_type=device.type, enabled=False)


def align_uniform_loss(
    out: ViewOutputs, *, uniformity_weight: float, t: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_align + beta * (L_unif(Z1) + L_unif(Z2)) / 2`` and its parts."""
    align = losses.alignment(*out.z)
    unif = losses.uniformity(torch.stack(out.z), t).mean()
    return align + uniformity_weight * unif, {"align": align.detach(), "uniform": unif.detach()}
