"""ImageNet-pretrained torchvision/timm ResNet weights as ``model.init_from``.

torchvision cannot be installed beside the CPU torch wheel, so the tests write its state dicts
themselves: the key names and shapes of torchvision's ``resnet18/34/50`` (He et al., CVPR 2016,
Table 1, in torchvision's module names, stride on the bottleneck's 3x3 convolution), and a
functional forward of that architecture to compare fedssd's model against.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from fedssd import config as config_module
from fedssd.config import Config
from fedssd.encoders import check_init_from, warm_start
from fedssd.errors import ConfigError, DataError
from fedssd.models import SSLModel, build_model
from fedssd.models.pretrained import fedssd_key, identify, to_fedssd, torchvision_key

DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "resnet50": (3, 4, 6, 3)}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_shapes(
    arch: str, *, width: int = 64, in_channels: int = 3, classes: int = 1000
) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Key and shape of every tensor of torchvision's ``arch`` state dict, in its order."""
    bottleneck = arch == "resnet50"
    expansion = 4 if bottleneck else 1

    def bn(name: str, channels: int) -> Iterator[tuple[str, tuple[int, ...]]]:
        for field in BN:
            yield f"{name}.{field}", () if field == "num_batches_tracked" else (channels,)

    yield "conv1.weight", (width, in_channels, 7, 7)
    yield from bn("bn1", width)
    channels = width
    for stage, depth in enumerate(DEPTHS[arch]):
        planes = width * 2**stage
        for block in range(depth):
            name = f"layer{stage + 1}.{block}"
            if bottleneck:
                yield f"{name}.conv1.weight", (planes, channels, 1, 1)
                yield from bn(f"{name}.bn1", planes)
                yield f"{name}.conv2.weight", (planes, planes, 3, 3)
                yield from bn(f"{name}.bn2", planes)
                yield f"{name}.conv3.weight", (planes * 4, planes, 1, 1)
                yield from bn(f"{name}.bn3", planes * 4)
            else:
                yield f"{name}.conv1.weight", (planes, channels, 3, 3)
                yield from bn(f"{name}.bn1", planes)
                yield f"{name}.conv2.weight", (planes, planes, 3, 3)
                yield from bn(f"{name}.bn2", planes)
            if block == 0 and (stage > 0 or channels != planes * expansion):
                yield f"{name}.downsample.0.weight", (planes * expansion, channels, 1, 1)
                yield from bn(f"{name}.downsample.1", planes * expansion)
            channels = planes * expansion
    yield "fc.weight", (classes, channels)
    yield "fc.bias", (classes,)


def torchvision_state(arch: str, *, seed: int = 0, **sizes: int) -> dict[str, Tensor]:
    """Random weights in torchvision's layout; running statistics far from 0 and 1 so that an
    eval-mode forward depends on them."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key, shape in torchvision_shapes(arch, **sizes):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith(("running_mean", "bias")):
            state[key] = 0.2 * torch.randn(shape, generator=generator)
        elif key.endswith("weight") and len(shape) == 1:
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=generator)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
    return state


def reference_forward(state: dict[str, Tensor], x: Tensor, arch: str) -> Tensor:
    """torchvision's ResNet forward in eval mode, without ``fc``: pooled features."""

    def bn(name: str, y: Tensor) -> Tensor:
        return F.batch_norm(
            y,
            state[f"{name}.running_mean"],
            state[f"{name}.running_var"],
            state[f"{name}.weight"],
            state[f"{name}.bias"],
            training=False,
            eps=1e-5,
        )

    def conv(name: str, y: Tensor, stride: int = 1) -> Tensor:
        weight = state[f"{name}.weight"]
        return F.conv2d(y, weight, stride=stride, padding=weight.shape[-1] // 2)

    y = F.relu(bn("bn1", F.conv2d(x, state["conv1.weight"], stride=2, padding=3)))
    y = F.max_pool2d(y, 3, stride=2, padding=1)
    for stage, depth in enumerate(DEPTHS[arch]):
        for block in range(depth):
            name = f"layer{stage + 1}.{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            if arch == "resnet50":
                out = F.relu(bn(f"{name}.bn1", conv(f"{name}.conv1", y)))
                out = F.relu(bn(f"{name}.bn2", conv(f"{name}.conv2", out, stride)))
                out = bn(f"{name}.bn3", conv(f"{name}.conv3", out))
            else:
                out = F.relu(bn(f"{name}.bn1", conv(f"{name}.conv1", y, stride)))
                out = bn(f"{name}.bn2", conv(f"{name}.conv2", out))
            if f"{name}.downsample.0.weight" in state:
                y = bn(f"{name}.downsample.1", conv(f"{name}.downsample.0", y, stride))
            y = F.relu(out + y)
    return y.mean(dim=(2, 3))


def model_config(path: Path, *, encoder: str, width: int = 0, projector: bool = False) -> Config:
    table: dict[str, object] = {"encoder": encoder, "width": width, "init_from": str(path)}
    if projector:
        table["init_projector"] = True
    return config_module.load({"model": table})


def started(path: Path, *, encoder: str, width: int = 0, in_channels: int = 3) -> SSLModel:
    config = model_config(path, encoder=encoder, width=width)
    torch.manual_seed(0)
    model = build_model(encoder=encoder, in_channels=in_channels, width=width or None)
    warm_start(model, config)
    return model


# The published sizes of torchvision's ResNets (their model cards): parameters with the 1000-way
# classifier, and state-dict entries (BatchNorm's buffers included).
PUBLISHED = {
    "resnet18": (11_689_512, 122),
    "resnet34": (21_797_672, 218),
    "resnet50": (25_557_032, 320),
}


@pytest.mark.parametrize("arch", sorted(DEPTHS))
def test_the_torchvision_layout_written_here_has_the_published_sizes(arch: str) -> None:
    shapes = dict(torchvision_shapes(arch))
    parameters = sum(
        int(torch.tensor(shape).prod())
        for key, shape in shapes.items()
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert (parameters, len(shapes)) == PUBLISHED[arch]


@pytest.mark.parametrize("arch", sorted(DEPTHS))
def test_every_key_maps_onto_the_imagenet_encoder_with_its_shape(arch: str) -> None:
    with torch.device("meta"):
        encoder = build_model(encoder=f"{arch}_imagenet").encoder
    own = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    shapes = dict(torchvision_shapes(arch))
    mapped = {fedssd_key(k): shape for k, shape in shapes.items() if not k.startswith("fc.")}
    assert mapped == own
    assert all(torchvision_key(str(fedssd_key(k))) == k for k in shapes if not k.startswith("fc."))
    # The encoder is torchvision's network less the classifier, parameter for parameter.
    classifier = sum(int(torch.tensor(shapes[k]).prod()) for k in ("fc.weight", "fc.bias"))
    assert sum(p.numel() for p in encoder.parameters()) == PUBLISHED[arch][0] - classifier


def test_key_mapping_examples() -> None:
    assert fedssd_key("conv1.weight") == "stem.0.weight"
    assert fedssd_key("bn1.running_var") == "stem.1.running_var"
    assert fedssd_key("layer3.1.conv2.weight") == "stages.2.1.conv2.weight"
    assert fedssd_key("layer2.0.downsample.1.bias") == "stages.1.0.shortcut.1.bias"
    assert fedssd_key("fc.weight") is None and fedssd_key("module.conv1.weight") is None
    names, unknown = to_fedssd({"fc.bias": torch.zeros(1), "head.w": torch.zeros(1)})
    assert (names, unknown) == ({}, ["head.w"])


@pytest.mark.parametrize(
    ("arch", "width", "in_channels", "encoder"),
    [
        ("resnet18", 64, 3, "resnet18_imagenet"),
        ("resnet34", 16, 3, "resnet34_imagenet"),
        ("resnet50", 8, 1, "resnet50_imagenet"),
    ],
)
def test_identify_names_the_encoder_a_state_dict_fits(
    arch: str, width: int, in_channels: int, encoder: str
) -> None:
    state = torchvision_state(arch, width=width, in_channels=in_channels)
    shape = identify(state)
    assert shape is not None
    assert (shape.encoder, shape.width, shape.in_channels) == (encoder, width, in_channels)
    state.pop("layer4.1.conv1.weight")
    state.pop("conv1.weight")
    assert identify(state) is None


@pytest.mark.parametrize(("arch", "suffix"), [("resnet18", ".pth"), ("resnet50", ".safetensors")])
def test_init_from_a_torchvision_file_gives_torchvisions_forward(
    tmp_path: Path, arch: str, suffix: str
) -> None:
    state = torchvision_state(arch, width=8)
    path = tmp_path / f"{arch}{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = started(path, encoder=f"{arch}_imagenet", width=8).eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(images), reference_forward(state, images, arch))
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, state[torchvision_key(key)]), key


def test_init_from_keeps_the_projector_and_needs_no_batch_counts(tmp_path: Path) -> None:
    """fc is dropped, the projector keeps the seed's weights, and a file without BatchNorm's
    num_batches_tracked (saved before PyTorch 0.4.1) still loads."""
    state = {
        k: v for k, v in torchvision_state("resnet18", width=8).items() if "num_batches" not in k
    }
    torch.save(state, tmp_path / "old.pth")
    model = started(tmp_path / "old.pth", encoder="resnet18_imagenet", width=8)
    torch.manual_seed(0)
    fresh = build_model(encoder="resnet18_imagenet", width=8)
    for key, value in fresh.projector.state_dict().items():
        assert torch.equal(model.projector.state_dict()[key], value)
    assert torch.equal(model.encoder.stem[0].weight, state["conv1.weight"])


def _refusal(path: Path, *, encoder: str, width: int = 0, in_channels: int = 3) -> str:
    with pytest.raises(DataError) as caught:
        started(path, encoder=encoder, width=width, in_channels=in_channels)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(".")
    return message


def test_a_file_of_another_architecture_names_the_encoder_it_fits(tmp_path: Path) -> None:
    torch.save(torchvision_state("resnet50", width=8), tmp_path / "r50.pth")
    message = _refusal(tmp_path / "r50.pth", encoder="resnet18_imagenet", width=8)
    assert "holds layer1.0.conv3.weight, which model.encoder = 'resnet18_imagenet'" in message
    assert "these weights fit model.encoder = 'resnet50_imagenet' with model.width = 8" in message
    torch.save(torchvision_state("resnet18", width=8), tmp_path / "r18.pth")
    message = _refusal(tmp_path / "r18.pth", encoder="resnet34_imagenet", width=8)
    assert "lacks layer1.2.conv1.weight, which model.encoder = 'resnet34_imagenet'" in message
    assert "fit model.encoder = 'resnet18_imagenet'" in message
    message = _refusal(tmp_path / "r18.pth", encoder="small_cnn", width=8)
    assert "which model.encoder = 'small_cnn' with model.width = 8 lacks" in message


def test_a_file_of_other_shapes_names_the_key_the_shapes_and_the_fit(tmp_path: Path) -> None:
    torch.save(torchvision_state("resnet18", width=16), tmp_path / "w16.pth")
    message = _refusal(tmp_path / "w16.pth", encoder="resnet18_imagenet", width=8)
    assert "holds conv1.weight of shape (16, 3, 7, 7) where model.encoder = " in message
    assert "has (8, 3, 7, 7); these weights fit " in message and "model.width = 16." in message
    # The CIFAR stem: same keys, a 3x3 first convolution.
    message = _refusal(tmp_path / "w16.pth", encoder="resnet18", width=16)
    assert "(16, 3, 7, 7) where model.encoder = 'resnet18' with model.width = 16 has " in message
    assert "fit model.encoder = 'resnet18_imagenet' with model.width = 16." in message
    # Grayscale images (data.rgb = false) against RGB weights.
    message = _refusal(tmp_path / "w16.pth", encoder="resnet18_imagenet", width=16, in_channels=1)
    assert "on 1-channel images has (16, 1, 7, 7)" in message
    assert "on 3-channel images (data.rgb = true)." in message


def test_files_that_are_no_resnet_state_dict_are_one_sentence(tmp_path: Path) -> None:
    state = torchvision_state("resnet18", width=8)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    message = _refusal(tmp_path / "ddp.pth", encoder="resnet18_imagenet", width=8)
    assert "holds module.conv1.weight, which is no key of a torchvision or timm ResNet" in message
    torch.save({"state_dict": state, "epoch": 90}, tmp_path / "checkpoint.pth")
    message = _refusal(tmp_path / "checkpoint.pth", encoder="resnet18_imagenet", width=8)
    assert "not a flat state dict of tensors" in message
    torch.save([1, 2], tmp_path / "list.pt")
    assert "holds a list, not a state dict" in _refusal(tmp_path / "list.pt", encoder="resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        traced = torch.jit.trace(torch.nn.Conv2d(3, 4, 3), torch.rand(1, 3, 8, 8))
        traced.save(str(tmp_path / "scripted.pt"))
    message = _refusal(tmp_path / "scripted.pt", encoder="resnet18")
    assert "is a TorchScript file, not a state dict" in message
    (tmp_path / "junk.pth").write_bytes(b"not a zip file at all")
    assert "torch.load(weights_only=True)" in _refusal(tmp_path / "junk.pth", encoder="resnet18")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    assert "not a readable safetensors" in _refusal(
        tmp_path / "junk.safetensors", encoder="resnet18"
    )


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("ran",))


def test_a_pickle_that_would_run_code_is_refused_unrun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save({"conv1.weight": _Payload()}, tmp_path / "evil.pth", pickle_module=pickle)
    capsys.readouterr()
    message = _refusal(tmp_path / "evil.pth", encoder="resnet18_imagenet")
    assert "torch.load(weights_only=True)" in message
    assert "ran" not in capsys.readouterr().out


def test_init_projector_with_a_pretrained_file_and_unknown_suffixes(tmp_path: Path) -> None:
    torch.save(torchvision_state("resnet18", width=8), tmp_path / "r18.pth")
    config = model_config(
        tmp_path / "r18.pth", encoder="resnet18_imagenet", width=8, projector=True
    )
    model = build_model(encoder="resnet18_imagenet", width=8)
    with pytest.raises(DataError, match=r"holds no projector; set model\.init_projector = false"):
        warm_start(model, config)
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"torchvision or timm ResNet state dict \(.pth, .pt"):
        check_init_from(model_config(tmp_path / "weights.npz", encoder="resnet18"))
