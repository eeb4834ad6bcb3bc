"""A run's model: the initial global model of a config (its weights from the run seed alone)
and the trained model of a finished run folder (:func:`load_run`) with the shape of the images it
takes (:func:`recorded_image_shape`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from fedssd.config import Config
from fedssd.errors import DataError
from fedssd.models import SSLModel, build_model
from fedssd.runs.resolve import load_config
from fedssd.seeding import MODEL_INIT, derive_seed

# The parts of a saved model every run has; other prefixes (a method's ``extras.``) are ignored.
_MODEL_PREFIXES = ("encoder.", "projector.")


def make_model(config: Config, in_channels: int, device: torch.device) -> SSLModel:
    """The initial global model, its weights drawn from the run seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, MODEL_INIT))
        model = model_of(config, in_channels=in_channels)
    return model.to(device)


def model_of(config: Config, *, in_channels: int) -> SSLModel:
    """The model ``config`` describes, its weights as PyTorch initialises them (the caller seeds
    the generator, and picks the device with ``torch.device(...)``)."""
    return build_model(
        encoder=config.model.encoder,
        in_channels=in_channels,
        width=config.model.width or None,
        projector_hidden=config.model.projector_hidden,
        projector_out=config.model.projector_out or None,
    )


def load_run(run_dir: str | Path) -> tuple[Config, SSLModel]:
    """The resolved config and the trained model (on the CPU) of a finished run.

    Only ``encoder.*`` and ``projector.*`` tensors are read, and they must match the model that
    ``config.toml`` describes exactly; other tensors (a method's ``extras.*``) are ignored. The
    file is read as safetensors only, so it can never run code.

    Args:
        run_dir: A folder written by :func:`fedssd.api.train`.

    Returns:
        ``(config, model)``; the model is in eval mode.

    Raises:
        ConfigError: ``config.toml`` is not a valid configuration.
        DataError: The folder, its config or its model file is missing, or the model file is
            damaged or does not match the config.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.toml"
    model_path = run_dir / "model.safetensors"
    if not run_dir.is_dir():
        raise DataError(f"Run folder {run_dir} does not exist; pass a folder `fedssd train` wrote.")
    for path in (config_path, model_path):
        if not path.is_file():
            raise DataError(
                f"{run_dir} has no {path.name}; pass the folder of a run that finished training."
            )
    config = load_config(config_path)
    tensors = _read_model_tensors(model_path)
    with torch.device("meta"):
        probe = make_model(config, 3, torch.device("meta"))
    expected = {k: v for k, v in probe.state_dict().items() if k.startswith(_MODEL_PREFIXES)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has the unknown tensor {unexpected[0]}"
        raise DataError(
            f"{model_path} {what}, so it does not hold the model {config_path.name} describes; "
            "evaluate the folder the model was trained in."
        )
    # The first convolution's weight is (out, in_channels, k, k); its file shape tells the
    # channels the model was trained on, which the config alone does not say (npz, rgb).
    first_conv = tensors[next(key for key, value in expected.items() if value.dim() == 4)]
    # A malformed tensor keeps the default here and is reported by the shape check below.
    in_channels = int(first_conv.shape[1]) if first_conv.dim() == 4 and first_conv.shape[1] else 3
    model = make_model(config, in_channels, torch.device("cpu"))
    own = {k: v for k, v in model.state_dict().items() if k.startswith(_MODEL_PREFIXES)}
    for key, value in own.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise DataError(
                f"{model_path} holds {key} of shape {tuple(tensors[key].shape)} where "
                f"{config_path.name} implies {tuple(value.shape)}; evaluate the folder the "
                "model was trained in."
            )
    model.load_state_dict(tensors, strict=False)
    return config, model.eval()


def recorded_image_shape(run_dir: Path) -> tuple[int, int, int] | None:
    """The ``(channels, height, width)`` of the images a run trained on, as its
    ``partition.json`` records it (None for a run written before it did, or without the file)."""
    try:
        shape = json.loads((run_dir / "partition.json").read_text(encoding="utf-8"))["image_shape"]
        channels, height, width = (int(v) for v in shape)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return channels, height, width


def _read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` and ``projector.*`` tensors of a safetensors file, on the CPU."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {
                key: handle.get_tensor(key)
                for key in handle.keys()  # noqa: SIM118 - safe_open handles are not mappings
                if key.startswith(_MODEL_PREFIXES)
            }
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DataError(
            f"{path} is not a readable safetensors file ({_first_line(error)}); it is damaged or "
            "truncated, so train the run again or restore the file."
        ) from None


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split()).rstrip(".")
    return text[:160] or type(error).__name__
