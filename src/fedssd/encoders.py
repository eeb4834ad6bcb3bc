"""Trained encoders out and in: ``fedssd export``, :func:`load_encoder` and ``model.init_from``.

:func:`export_encoder` writes a run's encoder (optionally with its projector) as safetensors,
TorchScript or ONNX, next to a JSON card saying what it expects and gives: input size,
channels, value range, feature width, method, data and the run's summary. :func:`load_encoder`
returns a ready ``nn.Module`` in eval mode from a run folder or an exported safetensors file.
:func:`warm_start` starts a new run's global model from a trained encoder (docs/export.md).

Models are only ever read from safetensors (never pickles), so loading one cannot run code.
"""

from __future__ import annotations

import json
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from fedssd.config import Config
from fedssd.errors import ConfigError, DataError
from fedssd.models.pretrained import identify, to_fedssd, torchvision_key
from fedssd.runs.model import load_run, make_model, recorded_image_shape
from fedssd.runs.outputs import write_json

Format = Literal["safetensors", "torchscript", "onnx"]
FORMATS: tuple[str, ...] = ("safetensors", "torchscript", "onnx")
SUFFIX = {"safetensors": ".safetensors", "torchscript": ".pt", "onnx": ".onnx"}
CARD_KEY = "fedssd_card"  # the card is also kept in the safetensors header under this key
# Image side of each dataset as fedssd feeds it (before data.pad_to_32).
_IMAGE_SIZE = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "cifar100": 32, "tiny_imagenet": 64}


class EncoderWithProjector(nn.Module):
    """``x -> (h, z_raw)``: the encoder's features and the projector's embedding."""

    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``(batch, feature_dim)`` and embedding ``(batch, embed_dim)``."""
        h = self.encoder(x)
        return h, self.projector(h)


def input_size(config: Config) -> int | None:
    """The image side the run was trained on, as its config implies it (None for an ``npz``
    dataset; a run's ``partition.json`` records the shape itself)."""
    if config.data.name == "folder":
        return config.data.image_size
    side = _IMAGE_SIZE.get(config.data.name)
    if side == 28 and config.data.pad_to_32:
        return 32
    return side


def _in_channels(model: nn.Module) -> int:
    first = next(p for p in model.parameters() if p.dim() == 4)
    return int(first.shape[1])


def make_card(
    config: Config,
    model: nn.Module,
    summary: Mapping[str, Any],
    *,
    projector: bool,
    fmt: str,
    image: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The JSON card of an exported encoder; ``image`` is the ``(height, width)`` the run
    recorded (None: the side its config implies, :func:`input_size`)."""
    from fedssd import config as config_module
    from fedssd.version import __version__

    raw = config_module.to_dict(config)
    side = input_size(config)
    height, width = image if image is not None else (side, side)
    outputs = ["features"] + (["embedding"] if projector else [])
    return {
        "format": fmt,
        "fedssd_version": __version__,
        "input": {
            "shape": ["batch", _in_channels(model), height, width],
            "channels": _in_channels(model),
            # The side of the square images (None when they are not square: see the shape).
            "size": height if height == width else None,
            "dtype": "float32",
            "value_range": [0.0, 1.0],
            "normalization": "none (pixels / 255, no mean/std)",
        },
        "outputs": outputs,
        "feature_dim": int(getattr(model, "feature_dim", 0)),
        "embed_dim": int(getattr(model, "embed_dim", 0)) if projector else None,
        "projector": projector,
        "method": config.method.name,
        "data": raw["data"],
        "model": raw["model"],
        "summary": {k: v for k, v in summary.items() if not isinstance(v, list | dict)},
    }


def export_encoder(
    run_dir: str | Path,
    fmt: str,
    *,
    projector: bool = False,
    out: str | Path | None = None,
    batch: int = 2,
) -> tuple[Path, Path]:
    """Write a finished run's encoder (and optionally projector) and its card.

    Args:
        run_dir: A folder ``fedssd train`` wrote.
        fmt: ``safetensors``, ``torchscript`` or ``onnx``.
        projector: Also export the projector (the module then returns ``(h, z_raw)``).
        out: The file to write (default ``<run>/export/encoder[-projector].<suffix>``); the card
            goes next to it as ``<name>.json``.
        batch: Batch of the random images the exported file is checked on.

    Returns:
        The model file and the card file.

    Raises:
        ConfigError: Unknown format, or an exporter's package is missing.
        DataError: The run folder does not hold a finished run, or the exported file does not
            reproduce the run's features.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    run_dir = Path(run_dir)
    config, model = load_run(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    name = "encoder-projector" if projector else "encoder"
    target = Path(out) if out is not None else run_dir / "export" / f"{name}{SUFFIX[fmt]}"
    if target.suffix == ".json":
        raise ConfigError(f"--out {target} ends in .json, the card's name; choose another name.")
    card_path = target.with_suffix(".json")
    module: nn.Module = (
        EncoderWithProjector(model.encoder, model.projector) if projector else model.encoder
    )
    module.eval()
    recorded = recorded_image_shape(run_dir)
    image = recorded[1:] if recorded is not None else None
    card = make_card(config, model, summary, projector=projector, fmt=fmt, image=image)
    side = input_size(config) or 32
    height, width = image if image is not None else (side, side)
    example = torch.rand(
        batch, _in_channels(model), height, width, generator=torch.Generator().manual_seed(0)
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        _save_safetensors(target, model, projector=projector, card=card)
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but it is still what most
            # downstream code (C++, mobile) loads.
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(module, example)
            traced.save(str(target))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            reloaded = torch.jit.load(str(target))
        card["max_abs_difference"] = _difference(module, reloaded, example)
    else:
        _export_onnx(module, example, target, projector=projector)
        card["max_abs_difference"] = _difference(module, _onnx_runner(target), example)
    write_json(card_path, card)
    return target, card_path


def _save_safetensors(
    path: Path, model: nn.Module, *, projector: bool, card: Mapping[str, Any]
) -> None:
    from safetensors.torch import save_file

    prefixes = ("encoder.", "projector.") if projector else ("encoder.",)
    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(prefixes)
    }
    save_file(tensors, str(path), metadata={CARD_KEY: json.dumps(card)})


def _export_onnx(module: nn.Module, example: Tensor, path: Path, *, projector: bool) -> None:
    try:
        import onnx  # noqa: F401 - the exporter needs it
    except ImportError:
        raise ConfigError(
            "ONNX export needs the onnx package; install it with pip install 'fedssd[export]'."
        ) from None
    outputs = ["features", "embedding"] if projector else ["features"]
    axes = {name: {0: "batch"} for name in ["images", *outputs]}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter (deprecated in favour of torch.export, which needs
        # onnxscript too): it needs only onnx, and these plain convolution stacks export exactly.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["images"],
            output_names=outputs,
            dynamic_axes=axes,
            dynamo=False,
        )


def _onnx_runner(path: Path) -> Any:
    try:
        import onnxruntime  # type: ignore[import-untyped]
    except ImportError:
        raise ConfigError(
            "checking the ONNX export needs onnxruntime; install it with pip install "
            "'fedssd[export]'."
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> Any:
        outputs = session.run(None, {"images": x.numpy()})
        tensors = [torch.from_numpy(o) for o in outputs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)

    return run


def _difference(module: nn.Module, exported: Any, example: Tensor) -> float:
    """Largest absolute difference between the run's model and the exported file on
    ``example``; over 1e-4 means the export is wrong."""
    with torch.no_grad():
        ours = module(example)
        theirs = exported(example)
    ours_t = ours if isinstance(ours, tuple) else (ours,)
    theirs_t = theirs if isinstance(theirs, tuple) else (theirs,)
    worst = max(float((a - b).abs().max()) for a, b in zip(ours_t, theirs_t, strict=True))
    if worst > 1e-4:
        raise DataError(
            f"the exported file gives features up to {worst:.3g} away from the run's model; "
            "report this as a bug."
        )
    return worst


# ----------------------------------------------------------------------------- loading


def load_encoder(source: str | Path, *, projector: bool = False) -> nn.Module:
    """A trained encoder ready for downstream use, in eval mode, on the CPU.

    Args:
        source: A run folder, or a ``.safetensors`` file ``fedssd export`` wrote.
        projector: Return the encoder with its projector (``x -> (h, z_raw)``) instead of the
            encoder alone (``x -> h``).

    Returns:
        The module; inputs are ``(batch, channels, size, size)`` float32 in ``[0, 1]`` (the
        card or ``config.toml`` says the channels and size).

    Raises:
        DataError: The source is not a finished run or an exported safetensors file, or lacks
            the projector asked for.
    """
    config, tensors = read_encoder_source(Path(source))
    model = _model_for(config, tensors)
    if projector and not any(k.startswith("projector.") for k in tensors):
        raise DataError(
            f"{source} holds no projector; export it with --projector or load the run folder."
        )
    model.load_state_dict(tensors, strict=False)
    model.eval()
    module: nn.Module = (
        EncoderWithProjector(model.encoder, model.projector) if projector else model.encoder
    )
    return module.eval()


def read_encoder_source(path: Path) -> tuple[Config, dict[str, Tensor]]:
    """The config and the ``encoder.*`` (and ``projector.*``) tensors of a run folder or an
    exported safetensors file.

    Raises:
        DataError: Neither, or unreadable.
    """
    from fedssd import config as config_module

    if path.is_dir():
        model_path = path / "model.safetensors"
        config_path = path / "config.toml"
        if not model_path.is_file() or not config_path.is_file():
            raise DataError(
                f"{path} is not a finished fedssd run (it needs config.toml and "
                "model.safetensors); pass a run folder or a file fedssd export wrote."
            )
        tensors, _ = _read_safetensors(model_path)
        return config_module.load(config_path), tensors
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; pass a run folder or a .safetensors file fedssd export wrote."
        )
    tensors, metadata = _read_safetensors(path)
    card_text = metadata.get(CARD_KEY)
    if card_text is None:
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise DataError(
                f"{path} carries no fedssd card (and {sidecar.name} is missing); pass a file "
                "fedssd export --format safetensors wrote."
            )
        card_text = sidecar.read_text(encoding="utf-8")
    try:
        card = json.loads(card_text)
        config = config_module.load({"data": card["data"], "model": card["model"]})
    except (ValueError, KeyError, TypeError, ConfigError) as error:
        raise DataError(f"the fedssd card of {path} is damaged ({error}).") from None
    return config, tensors


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {
                key: handle.get_tensor(key)
                for key in handle.keys()  # noqa: SIM118 - safe_open handles are not mappings
                if key.startswith(("encoder.", "projector."))
            }
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        text = " ".join(str(error).split())[:160]
        raise DataError(f"{path} is not a readable safetensors file ({text}).") from None
    if not any(k.startswith("encoder.") for k in tensors):
        raise DataError(f"{path} holds no encoder.* tensors; it is not a fedssd model file.")
    return tensors, metadata


def _model_for(config: Config, tensors: Mapping[str, Tensor]) -> Any:
    """The model ``config`` describes, with the channels its first convolution was trained on."""
    first = next(v for k, v in tensors.items() if k.startswith("encoder.") and v.dim() == 4)
    return make_model(config, int(first.shape[1]), torch.device("cpu"))


# ----------------------------------------------------------------------------- warm start


PRETRAINED_SUFFIXES = (".pth", ".pt", ".safetensors")


def check_init_from(config: Config, _probe: nn.Module | None = None) -> None:
    """Refuse a ``model.init_from`` that names nothing loadable (before any file is written).

    Raises:
        ConfigError: Not a run folder with a model, nor a ``.safetensors``, ``.pth`` or ``.pt``
            file.
    """
    source = Path(str(config.model.init_from))
    if source.is_dir() and (source / "model.safetensors").is_file():
        return
    if source.is_file() and source.suffix in PRETRAINED_SUFFIXES:
        return
    raise ConfigError(
        f"model.init_from = {str(source)!r} is neither a finished run folder (with "
        "model.safetensors), a .safetensors file fedssd export wrote, nor a torchvision or timm "
        "ResNet state dict (.pth, .pt or .safetensors)."
    )


def warm_start(model: nn.Module, config: Config, *, log: Any = None) -> None:
    """Copy the trained encoder (and, with ``model.init_projector``, projector) named by
    ``model.init_from`` into ``model``: a fedssd run or export, or the ImageNet-pretrained
    weights of a torchvision or timm ResNet.

    Raises:
        ConfigError: The source is not loadable.
        DataError: Its tensors do not fit this run's model, in one sentence.
    """
    check_init_from(config)
    source = Path(str(config.model.init_from))
    if not _fedssd_source(source):
        _start_from_pretrained(model, config, source, log=log)
        return
    _, tensors = read_encoder_source(source)
    parts = ("encoder.", "projector.") if config.model.init_projector else ("encoder.",)
    own = model.state_dict()
    chosen = {k: v for k, v in tensors.items() if k.startswith(parts)}
    if config.model.init_projector and not any(k.startswith("projector.") for k in chosen):
        raise DataError(
            f"model.init_projector = true but {source} holds no projector; export it with "
            "--projector or start from the run folder."
        )
    wanted = {k for k in own if k.startswith(parts)}
    missing = sorted(wanted - set(chosen))
    extra = sorted(set(chosen) - wanted)
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model lacks"
        raise DataError(
            f"model.init_from {source} {what}; start from a run with the same model.encoder "
            "and model.width."
        )
    for key, value in chosen.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise DataError(
                f"model.init_from {source} holds {key} of shape {tuple(value.shape)} where this "
                f"run's model has {tuple(own[key].shape)}; start from a run with the same "
                "model.encoder, model.width, projector sizes and image channels."
            )
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in chosen.items()}, strict=False)
    if log is not None:
        which = "encoder and projector" if config.model.init_projector else "encoder"
        log(f"starting from the trained {which} of {source}")


def _fedssd_source(path: Path) -> bool:
    """A run folder or a file fedssd export wrote (its tensors are named ``encoder.*``)."""
    if path.is_dir():
        return True
    if path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return any(key.startswith("encoder.") for key in handle.keys())  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        text = " ".join(str(error).split())[:160]
        raise DataError(f"{path} is not a readable safetensors file ({text}).") from None


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` state dict read with
    ``torch.load(weights_only=True)`` (tensors and plain containers only, so reading cannot run
    code).

    Raises:
        DataError: Unreadable, or not a flat mapping of names to tensors.
    """
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            text = " ".join(str(error).split())[:160]
            raise DataError(f"{path} is not a readable safetensors file ({text}).") from None
    try:
        with warnings.catch_warnings():
            # torch.load announces a TorchScript archive before refusing it; the refusal says so.
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, RuntimeError) as error:
        text = " ".join(str(error).split())[:160]
        if "TorchScript" in text:
            raise DataError(
                f"{path} is a TorchScript file, not a state dict; start from the run folder or "
                "its .safetensors export (fedssd export --format safetensors)."
            ) from None
        raise DataError(
            f"{path} is not a PyTorch state dict that torch.load(weights_only=True) can read "
            f"({text})."
        ) from None
    if not isinstance(loaded, Mapping):
        raise DataError(
            f"{path} holds a {type(loaded).__name__}, not a state dict; save the model's "
            "state_dict() (names -> tensors)."
        )
    for key, value in loaded.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise DataError(
                f"{path} holds {key!r} -> {type(value).__name__}, not a flat state dict of "
                "tensors; save the model's state_dict() alone (not a training checkpoint)."
            )
    return dict(loaded)


def _start_from_pretrained(model: nn.Module, config: Config, source: Path, *, log: Any) -> None:
    """Copy a torchvision or timm ResNet's weights (their classifier ``fc`` dropped) into
    the encoder; refuse a file that does not fit, naming the encoder it would fit."""
    if config.model.init_projector:
        raise DataError(
            f"model.init_projector = true but {source} is a torchvision or timm state dict, "
            "which holds no projector; set model.init_projector = false."
        )
    state = read_state_dict(source)
    names, unknown = to_fedssd(state)
    shape = identify(state)
    encoder = model.get_submodule("encoder")
    own = encoder.state_dict()
    channels = _in_channels(encoder)
    differ = shape is not None and shape.in_channels != channels
    here = _describe(config.model.encoder, config.model.width, channels if differ else None)
    fits = (
        "these weights are no ResNet-18, 34 or 50 of torchvision or timm"
        if shape is None
        else "these weights fit "
        + _describe(shape.encoder, shape.width, shape.in_channels if differ else None)
    )
    if unknown:
        raise DataError(
            f"model.init_from {source} holds {unknown[0]}, which is no key of a torchvision or "
            f"timm ResNet (conv1, bn1, layer1-4, fc); {fits}."
        )
    # The first misfit in the file's (or the model's) order, which is the network's order.
    extra = [theirs for ours, theirs in names.items() if ours not in own]
    # Checkpoints saved before PyTorch 0.4.1 (torchvision's first ResNet weights among them)
    # lack BatchNorm's num_batches_tracked; the model keeps its own count then.
    missing = [k for k in own if k not in names and not k.endswith("num_batches_tracked")]
    if extra:
        raise DataError(f"model.init_from {source} holds {extra[0]}, which {here} lacks; {fits}.")
    if missing:
        raise DataError(
            f"model.init_from {source} lacks {torchvision_key(missing[0])}, which {here} needs; "
            f"{fits}."
        )
    for ours, theirs in names.items():
        if tuple(state[theirs].shape) != tuple(own[ours].shape):
            raise DataError(
                f"model.init_from {source} holds {theirs} of shape {tuple(state[theirs].shape)} "
                f"where {here} has {tuple(own[ours].shape)}; {fits}."
            )
    device = next(encoder.parameters()).device
    encoder.load_state_dict(
        {ours: state[theirs].to(device) for ours, theirs in names.items()}, strict=False
    )
    if log is not None:
        log(f"starting the encoder from the pretrained ResNet weights of {source}")


def _describe(encoder: str, width: int, channels: int | None) -> str:
    """``model.encoder = 'resnet50_imagenet'``, with a width other than the default and, when
    given, the image channels."""
    words = f"model.encoder = {encoder!r}"
    if width not in (0, 64):
        words += f" with model.width = {width}"
    if channels is None:
        return words
    colour = " (data.rgb = true)" if channels == 3 else ""
    return f"{words} on {channels}-channel images{colour}"


__all__ = [
    "EncoderWithProjector",
    "check_init_from",
    "export_encoder",
    "load_encoder",
    "warm_start",
]
