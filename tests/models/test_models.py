"""Tests for the encoders, the projector and the model factory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedssd.errors import ConfigError
from fedssd.models import ENCODERS, ResNet, SmallCNN, SSLModel, build_model, mlp_projector

# The CIFAR ResNet-18 with a 512 -> 10 classifier has 11,173,962 parameters; without the
# classifier's 512 * 10 + 10 that leaves this many.
RESNET18_CIFAR_PARAMETERS = 11_173_962 - (512 * 10 + 10)


def cifar_resnet18(*, in_channels: int = 3, width: int = 64) -> ResNet:
    return ENCODERS["resnet18"](in_channels=in_channels, width=width)  # type: ignore[return-value]


def count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def resnet18_parameters_by_hand(in_channels: int, width: int) -> int:
    """Weights of every convolution and BatchNorm (weight and bias), layer by layer."""
    total = in_channels * width * 9 + 2 * width
    channels = width
    for stage in range(4):
        out = width * 2**stage
        for block in range(2):
            block_in = channels if block == 0 else out
            total += block_in * out * 9 + 2 * out + out * out * 9 + 2 * out
            if block_in != out or (block == 0 and stage > 0):
                total += block_in * out + 2 * out
        channels = out
    return total


def thin_resnet_parameters_by_hand(in_channels: int, width: int, blocks: int) -> int:
    """He et al.'s CIFAR ResNet (depth 6 n + 2) with 1x1 projection shortcuts, layer by layer."""
    total = in_channels * width * 9 + 2 * width
    channels = width
    for stage in range(3):
        out = width * 2**stage
        for block in range(blocks):
            block_in = channels if block == 0 else out
            total += block_in * out * 9 + 2 * out + out * out * 9 + 2 * out
            if block_in != out:
                total += block_in * out + 2 * out
        channels = out
    return total


def test_encoder_registry_names() -> None:
    assert set(ENCODERS) == {
        "small_cnn",
        "resnet8",
        "resnet20",
        *(f"resnet{depth}{stem}" for depth in (18, 34, 50) for stem in ("", "_imagenet")),
    }


@pytest.mark.parametrize(("name", "blocks"), [("resnet8", 1), ("resnet20", 3)])
def test_thin_cifar_resnets(name: str, blocks: int) -> None:
    model = build_model(encoder=name, projector_hidden=32, projector_out=None)
    assert model.feature_dim == 64
    h, z = model(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, 64) and z.shape == (2, 64)
    # ResNet-20: 0.27M parameters in He et al.'s table (option A shortcuts, classifier included);
    # the two 1x1 projections of option B add 2,752 and the 64 -> 10 classifier is left out.
    assert count(model.encoder) == thin_resnet_parameters_by_hand(3, 16, blocks)
    if name == "resnet20":
        assert count(model.encoder) == 269_722 - (64 * 10 + 10) + 2_752
    narrow = build_model(encoder=name, in_channels=1, width=8, projector_hidden=32)
    assert narrow.feature_dim == 32
    assert count(narrow.encoder) == thin_resnet_parameters_by_hand(1, 8, blocks)
    strides = [m.stride[0] for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert strides.count(2) == 4  # two 3x3 and two 1x1 convolutions halve the resolution
    assert len([m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]) == (
        1 + 6 * blocks + 2
    )


def test_resnet18_shapes() -> None:
    model = build_model(encoder="resnet18")
    h, z = model(torch.randn(2, 3, 32, 32))
    assert (model.feature_dim, model.embed_dim) == (512, 512)
    assert h.shape == (2, 512)
    assert z.shape == (2, 512)


@pytest.mark.parametrize(
    ("width", "projector_out", "feature_dim", "embed_dim"),
    [(None, 512, 128, 512), (16, 512, 64, 512), (8, None, 32, 32)],
)
def test_small_cnn_shapes(
    width: int | None, projector_out: int | None, feature_dim: int, embed_dim: int
) -> None:
    model = build_model(
        encoder="small_cnn",
        in_channels=1,
        width=width,
        projector_hidden=64,
        projector_out=projector_out,
    )
    h, z = model(torch.randn(4, 1, 28, 28))
    assert (model.feature_dim, model.embed_dim) == (feature_dim, embed_dim)
    assert h.shape == (4, feature_dim)
    assert z.shape == (4, embed_dim)


def test_resnet18_has_stride_one_3x3_stem_and_no_max_pool() -> None:
    encoder = cifar_resnet18()
    stem = encoder.stem[0]
    assert isinstance(stem, nn.Conv2d)
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (1, 1), (1, 1))
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) for m in encoder.modules())
    assert not any(isinstance(m, nn.Linear) for m in encoder.modules())
    # Strides 1, 2, 2, 2: a 32x32 image reaches the pool at 4x4 with 8w channels.
    maps = encoder.stages(encoder.stem(torch.randn(1, 3, 32, 32)))
    assert maps.shape == (1, 512, 4, 4)


def test_resnet18_parameter_count() -> None:
    assert resnet18_parameters_by_hand(3, 64) == RESNET18_CIFAR_PARAMETERS == 11_168_832
    assert count(cifar_resnet18()) == RESNET18_CIFAR_PARAMETERS
    assert count(cifar_resnet18(in_channels=1, width=16)) == resnet18_parameters_by_hand(1, 16)


def test_imagenet_stem_is_a_7x7_stride_2_convolution_and_a_max_pool() -> None:
    encoder = ENCODERS["resnet18_imagenet"](width=8)
    conv, _, _, pool = encoder.stem
    assert isinstance(conv, nn.Conv2d) and isinstance(pool, nn.MaxPool2d)
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    # 224 / 4 after the stem, / 8 more over the stages: a 7x7 map, as in He et al. (Table 1).
    stem = encoder.stem(torch.randn(1, 3, 224, 224))
    assert stem.shape == (1, 8, 56, 56)
    assert encoder.stages(stem).shape == (1, 64, 7, 7)


@pytest.mark.parametrize(
    ("encoder", "feature_dim", "blocks"),
    [
        ("resnet18_imagenet", 512, 8),
        ("resnet34_imagenet", 512, 16),
        ("resnet50_imagenet", 2048, 16),
        ("resnet50", 2048, 16),
    ],
)
def test_resnet_depths_and_feature_widths_flow_to_the_projector(
    encoder: str, feature_dim: int, blocks: int
) -> None:
    with torch.device("meta"):
        model = build_model(encoder=encoder, projector_out=None)
    assert (model.feature_dim, model.embed_dim) == (feature_dim, feature_dim)
    assert model.projector[0].in_features == feature_dim
    stages = model.encoder.stages
    assert sum(len(stage) for stage in stages) == blocks
    # Bottlenecks put the stride on the 3x3 convolution (torchvision's and timm's layout).
    first = stages[1][0]
    strided = [name for name, m in first.named_modules() if getattr(m, "stride", None) == (2, 2)]
    assert strided[0] == ("conv1" if feature_dim == 512 else "conv2")


@pytest.mark.parametrize("size", [32, 64, 224])
def test_imagenet_resnets_take_images_of_any_size(size: int) -> None:
    for name in ("resnet18_imagenet", "resnet50_imagenet"):
        model = build_model(encoder=name, width=4, projector_hidden=16, projector_out=8).eval()
        h, z = model(torch.rand(2, 3, size, size))
        assert h.shape == (2, model.feature_dim) and z.shape == (2, 8)
        assert torch.isfinite(h).all()


def test_small_cnn_structure() -> None:
    encoder = SmallCNN(width=8)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.bias) for c in convs] == [
        (3, 8, None),
        (8, 16, None),
        (16, 32, None),
    ]
    assert sum(isinstance(m, nn.MaxPool2d) for m in encoder.modules()) == 2
    assert encoder.features(torch.randn(1, 3, 32, 32)).shape == (1, 32, 8, 8)


def test_projector_structure() -> None:
    projector = mlp_projector(512)
    first, norm, relu, last = projector
    assert isinstance(first, nn.Linear) and (first.in_features, first.out_features) == (512, 2048)
    assert isinstance(norm, nn.BatchNorm1d) and norm.num_features == 2048
    assert isinstance(relu, nn.ReLU)
    assert isinstance(last, nn.Linear) and (last.in_features, last.out_features) == (2048, 512)
    small = mlp_projector(32, hidden_dim=64, out_dim=16)
    assert [tuple(p.shape) for p in small.parameters()] == [
        (64, 32),
        (64,),
        (64,),
        (64,),
        (16, 64),
        (16,),
    ]


def test_model_forward_is_encoder_then_projector_without_normalisation() -> None:
    model = build_model(encoder="small_cnn", width=8, projector_hidden=32, projector_out=16).eval()
    images = torch.rand(5, 3, 32, 32)
    h, z = model(images)
    torch.testing.assert_close(h, model.encoder(images))
    torch.testing.assert_close(z, model.projector(h))
    assert not torch.allclose(z.norm(dim=1), torch.ones(5))
    assert isinstance(model, SSLModel)


def test_unknown_encoder_raises_config_error_naming_choices() -> None:
    with pytest.raises(ConfigError, match=r"resnet18.*small_cnn"):
        build_model(encoder="resnet101")


def test_channels_last_and_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = build_model(encoder="small_cnn", width=8, projector_hidden=32, projector_out=16).eval()
    images = torch.rand(4, 3, 32, 32)
    h, z = model(images)
    # Module.to(memory_format=...) is documented but missing from torch's typing overloads.
    model_cl = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    h_cl, z_cl = model_cl(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(h_cl, h, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z_cl, z, atol=1e-5, rtol=1e-4)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        h_bf, z_bf = model_cl(images.to(memory_format=torch.channels_last))
    assert z_bf.dtype == torch.bfloat16
    torch.testing.assert_close(h_bf.float(), h, atol=0.05, rtol=0.05)
    torch.testing.assert_close(z_bf.float(), z, atol=0.05, rtol=0.05)


def test_a_few_sgd_steps_reduce_a_regression_loss() -> None:
    torch.manual_seed(0)
    model = build_model(encoder="small_cnn", width=8, projector_hidden=64, projector_out=8)
    images = torch.rand(16, 3, 16, 16)
    target = torch.randn(16, 8)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        _, z = model(images)
        loss = (z - target).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
