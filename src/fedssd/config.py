"""Experiment configuration: frozen dataclasses and the one function that parses them.

A configuration is a TOML file whose tables mirror the dataclasses below (``[data]``,
``[model]``, ``[method]``, ``[federation]``, ``[evaluation]``, ``[checkpoint]``, ``[faults]``,
``[validation]``, ``[tracking]``) plus the top-level ``seed``, ``device``, ``precision`` and
``threads``. :func:`load` reads a file, applies ``key=value`` overrides (``federation.rounds=5``),
rejects unknown keys, wrong types and out-of-range values with a
:class:`~fedssd.errors.ConfigError`, and returns a :class:`Config`. The ``[method]`` table holds
``name`` plus that method's own options; those are checked against the method's option dataclass
by :func:`fedssd.methods.resolve_options`, so this module never needs to know any method.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from fedssd.errors import ConfigError

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import tomli_w

T = TypeVar("T", bound="DataclassInstance")

Partition = Literal["iid", "dirichlet", "pathological", "file", "clients"]
LrSchedule = Literal["constant", "cosine"]
DirichletRule = Literal["redraw", "released"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Sampling = Literal["fixed", "poisson"]
ResizeFilter = Literal["box", "bilinear-antialias"]
TRACKING_BACKENDS = ("tensorboard", "wandb", "mlflow")
"""The names ``tracking.backends`` may list (fedssd.tracking starts them)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset, where it lives, and how it is split over clients.

    Attributes:
        name: ``fashion_mnist``, ``mnist``, ``cifar10``, ``cifar100``, ``tiny_imagenet``, ``npz``
            (your arrays) or ``folder`` (your PNG/JPEG files).
        path: A file or folder holding a local copy (required for ``npz`` and ``folder``; with
            ``partition = "clients"`` and no ``clients`` list, a folder of one subfolder per
            client).
        root: Folder where datasets are looked for and downloaded to (else ``$FEDSSD_DATA``).
        download: Download from the official source (checksum-verified) when no copy is found.
        partition: ``iid``, ``dirichlet`` (label skew), ``pathological``, ``file`` or ``clients``
            (each client is one given dataset: the natural split of real sites).
        alpha: Dirichlet concentration; smaller is more skewed (the paper uses 0.1).
        classes_per_client: Classes per client for the pathological split.
        split_file: JSON list of per-client index lists, for ``partition = "file"``.
        min_client_size: Dirichlet splits are redrawn until every client has this many samples
            (the ``redraw`` rule).
        dirichlet_rule: ``redraw`` (cut each class's shuffled indices at the floored cumulative
            shares; redraw the whole split until every client has ``min_client_size``) or
            ``released`` (the SSD authors' splitter: floor each client's count, hand the
            leftovers out by largest remainder, no redraw).
        train_subset: Use a stratified random subset of this many training images (0 = all).
        test_subset: Evaluate on a stratified random subset of this many test images (0 = all).
        pad_to_32: Zero-pad 28x28 images to 32x32, as the CIFAR code path expects.
        rgb: Repeat grayscale images to 3 channels (false: every image of a folder is read as
            one grayscale channel).
        image_size: Side of the square images a ``folder`` dataset is resized and centre-cropped
            to.
        resize: How Tiny-ImageNet's 64x64 images are reduced to 32x32: ``box`` (Pillow's BOX
            filter, the mean of each 2x2 block) or ``bilinear-antialias`` (torchvision's
            antialiased bilinear ``Resize``, as in the SSD authors' code). Each filter has its
            own decoded cache. Other datasets are not resized by it (a ``folder`` dataset always
            uses Pillow's BICUBIC, see :mod:`fedssd.data.folder`).
        clients: For ``partition = "clients"``: one dataset per client, each a folder of images
            or an ``.npz`` file (empty: each subfolder of ``path`` is one client).
    """

    name: str = "fashion_mnist"
    path: str | None = None
    root: str | None = None
    download: bool = True
    partition: Partition = "dirichlet"
    alpha: float = 0.1
    classes_per_client: int = 2
    split_file: str | None = None
    min_client_size: int = 10
    dirichlet_rule: DirichletRule = "redraw"
    train_subset: int = 0
    test_subset: int = 0
    pad_to_32: bool = True
    rgb: bool = True
    image_size: int = 32
    resize: ResizeFilter = "box"
    clients: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Encoder and projector.

    Attributes:
        encoder: ``resnet18`` (the paper's CIFAR ResNet-18: a 3x3 stride-1 stem for 32x32
            images), ``resnet34`` or ``resnet50`` with the same stem; ``resnet18_imagenet``,
            ``resnet34_imagenet`` or ``resnet50_imagenet`` (the ImageNet stem: 7x7 stride-2
            convolution and max-pool, for larger images and ImageNet weights); ``resnet8`` or
            ``resnet20`` (the thin CIFAR ResNets of He et al.); or ``small_cnn`` (fast on a CPU).
        width: Base channel width (0 = the encoder's default: 64 for ResNet-18/34/50, 16 for
            ResNet-8 and ResNet-20, 32 for the CNN).
        projector_hidden: Hidden width of the projector MLP (2048 in the paper).
        projector_out: Output width of the projector (0 = the encoder's feature dimension, as in
            the paper, where both are 512; projector distillation needs them equal).
        init_from: Start from a trained encoder instead of the seed's random weights: a run
            folder or a file ``fedssd export`` wrote (warm start, transfer across datasets), or
            a torchvision or timm ResNet state dict (``.pth``, ``.pt``, ``.safetensors``;
            docs/export.md). Unset: random initialisation.
        init_projector: With ``init_from``, also copy the projector (default: encoder only).
    """

    encoder: str = "resnet18"
    width: int = 0
    projector_hidden: int = 2048
    projector_out: int = 0
    init_from: str | None = None
    init_projector: bool | None = None


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The federated SSL method and its own options (checked by the method registry)."""

    name: str = "ssd"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """The federated training schedule (docs/methods.md, "The paper's protocol", gives the
    SSD paper's values).

    Attributes:
        num_clients: Number of clients K.
        fraction: Fraction of clients sampled each round (1.0 = cross-silo).
        sampling: ``fixed`` (``round(fraction * K)`` clients without replacement) or ``poisson``
            (each client independently with probability ``fraction``: the cohort's size varies).
        rounds: Communication rounds.
        local_epochs: Local epochs per round.
        batch_size: Local mini-batch size.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        lr_schedule: ``constant`` (the paper) or ``cosine`` over rounds.
        drop_last: Skip each local epoch's last, incomplete batch (the released SSD code did so
            for K <= 10). The FedAvg weight stays the number of batches trained, so only full
            batches count; a client with fewer samples than ``batch_size`` trains no step and is
            left out of the round's aggregation.
    """

    num_clients: int = 10
    fraction: float = 1.0
    sampling: Sampling = "fixed"
    rounds: int = 100
    local_epochs: int = 5
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: LrSchedule = "constant"
    drop_last: bool = False


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Monitoring during training and the final evaluation.

    Attributes:
        every: Run the kNN monitor every this many rounds (0 = only at the end).
        knn_k: Neighbours of the weighted kNN monitor.
        knn_temperature: Temperature of the kNN weights.
        linear_epochs: Epochs of the linear probe (Adam on cached features); 0 = no probe
            (``linear_probe_acc`` is then null in ``summary.json``).
        linear_lr: Learning rate of the linear probe.
        linear_batch_size: Batch size of the linear probe.
        metrics_samples: Largest sample (over all clients) for uniformity and effective rank.
        metrics_per_client: Largest sample per client for per-client and inter-client uniformity.
        batch_size: Batch size of feature extraction, in 32x32 images (larger images go in
            proportionally fewer per forward pass).
        data: A labelled evaluation set the server owns: an ``.npz`` file, a folder with one
            subfolder per class, or the name of a built-in dataset (its official test split).
            When set, the kNN monitor, the linear probe and the representation metrics use it
            instead of the clients' images (see docs/evaluation.md).
    """

    every: int = 10
    knn_k: int = 200
    knn_temperature: float = 0.1
    linear_epochs: int = 200
    linear_lr: float = 3e-3
    linear_batch_size: int = 512
    metrics_samples: int = 10000
    metrics_per_client: int = 1000
    batch_size: int = 1024
    data: str | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints for ``fedssd train --resume``.

    Attributes:
        every: Write a checkpoint every this many rounds, and after the last (0 = never).
        keep: How many of the newest checkpoints to keep (older ones are deleted).
    """

    every: int = 5
    keep: int = 2


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """Simulated client failures (all off by default).

    Each sampled client independently, from the run seed: crashes before training with
    probability ``crash``; else trains but misses the round's deadline with probability
    ``straggle``; else trains but its update is lost with probability ``drop``.

    Attributes:
        crash: Probability that a sampled client crashes.
        straggle: Probability that a client straggles past the deadline.
        drop: Probability that a client's update never arrives.
        min_clients: A round with fewer surviving (accepted) updates is skipped: the global
            model stays as it was, and the round is logged.
    """

    crash: float = 0.0
    straggle: float = 0.0
    drop: float = 0.0
    min_clients: int = 1


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Server-side checks of each client update (non-finite values, keys and shapes always).

    Attributes:
        max_norm_ratio: Reject an update whose learned weights (parameters, not BatchNorm's
            running statistics) moved, per local step, more than this many times the median
            of the round's other updates (0 = no norm check). Unset in a config file, it is
            10, or 0 when ``privacy.dp`` is on (one client's update must not decide whether
            another's is averaged: that breaks DP's sensitivity bound).
        min_peers: The norm check needs at least this many other updates in the round. Below
            3 the median of the others is the mean of two, which one slow honest site pulls
            down far enough to make a fast honest one look like an outlier.
    """

    max_norm_ratio: float = 10.0
    min_peers: int = 3


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers the run reports to (docs/tracking.md); none by default.

    Where a run is logged is not part of what it computes: checkpoints and sweeps ignore this
    table when they compare configs.

    Attributes:
        backends: Comma-separated ``tensorboard``, ``wandb``, ``mlflow`` (empty: none).
        project: W&B project and MLflow experiment name.
        run_name: The run's name in the trackers (empty: the run folder's name).
        group: Groups runs (W&B group, MLflow parent run); a sweep or comparison sets it.
        wandb_mode: ``auto`` (online when W&B has an API key, else offline; ``WANDB_MODE``
            wins), ``online`` or ``offline``.
        wandb_entity: The W&B team or user (empty: the account's default).
        mlflow_uri: MLflow tracking URI (empty: a file store ``<run>/mlruns``).
        mlflow_parent_run: The MLflow run this one is nested under (set by a sweep).
    """

    backends: str = ""
    project: str = "fedssd"
    run_name: str = ""
    group: str = ""
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    wandb_entity: str = ""
    mlflow_uri: str = ""
    mlflow_parent_run: str = ""


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """Client-level differential privacy, DP-FedAvg (docs/privacy.md; off by default).

    Attributes:
        dp: ``off``, ``fixed`` (clip norm ``clip_norm`` all run) or ``adaptive`` (the clip norm
            tracks the ``target_quantile`` of the update norms, Andrew et al. 2021).
        mode: Where the noise is added. ``central``: the server clips each update and noises the
            sum (it sees every raw update). ``distributed``: each client clips its own update
            and adds its share of the noise, and SecAgg+ shows the server only the noised sum
            (Flower with ``secure-aggregation = true`` only; fixed clipping only).
        min_replies: Distributed mode: the fraction of the cohort whose noise shares every
            unmasked sum holds at least (SecAgg+'s reconstruction threshold is set to it, so a
            round with fewer replies cannot be unmasked). Calibration and the budget assume that
            many; each round is accounted with the shares actually in its sum. In [0.5, 1].
        clip_norm: L2 bound C on each client's update (adaptive: its initial value); 0 = no
            clipping (only with ``noise_multiplier = 0``: a check of the code path, no privacy).
        noise_multiplier: z, the noise's standard deviation on the sum in units of C; unset
            means: the smallest z that meets ``target_epsilon`` over ``federation.rounds``.
        target_epsilon: The privacy budget; the run stops, before the round that would exceed
            it, with one sentence (0 = no budget).
        delta: The delta of (epsilon, delta).
        weighting: ``uniform`` (every update counts the same) or ``batches`` (a client's weight
            is ``min(batches, weight_cap) / weight_cap``; needs ``weight_cap``).
        weight_cap: The public cap on a client's weight, in local mini-batches (``weighting =
            "batches"``): with it every weight is at most 1, so the sensitivity stays ``C``.
        target_quantile: gamma, the fraction of updates that should fall within the clip norm.
        clip_lr: eta, the geometric learning rate of the clip norm.
        count_noise_multiplier: sigma_b, the noise on the count of updates within the norm;
            unset means m / 20 (m: clients per round), Andrew et al.'s recommendation.
        reproducible_noise: Draw the noise and the cohort from the run seed instead of a secret
            (for tests only: anyone with ``config.toml`` can then regenerate the noise and
            subtract it, so the run is not private; its summary and the CLI say so).
    """

    dp: Literal["off", "fixed", "adaptive"] = "off"
    mode: Literal["central", "distributed"] = "central"
    min_replies: float = 0.5
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float = 0.0
    delta: float = 1e-5
    weighting: Literal["uniform", "batches"] = "uniform"
    weight_cap: float = 0.0
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise_multiplier: float | None = None
    reproducible_noise: bool = False


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole experiment.

    Attributes:
        seed: The run seed; every random number of the run is derived from it.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``
            (float16 autocast with a gradient scaler, as the released SSD code trained; CUDA
            only, refused on a CPU).
        threads: CPU threads of PyTorch's operators (``torch.set_num_threads``); 0 leaves
            PyTorch's own choice (one per physical core, or ``OMP_NUM_THREADS``). Results are
            bit-identical for the same CPU model and thread count; on a machine shared with
            other jobs, 1 avoids the slowdown of more threads than free cores.
    """

    seed: int = 17
    device: str = "auto"
    precision: Precision = "auto"
    threads: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    federation: FederationConfig = dataclasses.field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    faults: FaultConfig = dataclasses.field(default_factory=FaultConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = dataclasses.field(default_factory=PrivacyConfig)


def load(
    source: str | Path | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> Config:
    """Build a :class:`Config` from a TOML file (or a mapping) and ``key=value`` overrides.

    Args:
        source: Path of a TOML file, an already-parsed mapping, or None for the defaults.
        overrides: Strings ``dotted.key=value``; the value is read as TOML (``5``, ``true``,
            ``"text"``), and as a bare string when it is not valid TOML (``method.name=ssd``).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: The file is missing or not TOML, or a key is unknown, of the wrong type or
            out of range.
    """
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        raw = _deep_copy(source)
    else:
        raw = read_toml(Path(source))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    _private_defaults(raw)
    config = from_dict(Config, raw, where="")
    validate(config)
    return config


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning every failure into one sentence."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"config path {path} is a folder, not a TOML file.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} cannot be read: {error}.") from None


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``dotted.key=value`` and read the value as TOML, else as a plain string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override {item!r} is not of the form key=value (e.g. federation.rounds=5)."
        )
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def to_dict(config: Config) -> dict[str, Any]:
    """The configuration as nested plain data (None values left out, as TOML has no null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, tuple | list):
            return [clean(v) for v in value]
        return value

    raw = dataclasses.asdict(config)
    method = raw.pop("method")
    raw["method"] = {"name": method["name"], **dict(method["options"])}
    result: dict[str, Any] = clean(raw)
    return result


def dumps(config: Config) -> str:
    """The configuration as TOML text that :func:`load` reads back to the same value."""
    return tomli_w.dumps(to_dict(config))


def from_dict(cls: type[T], raw: Mapping[str, Any], *, where: str) -> T:
    """Build dataclass ``cls`` from ``raw``, checking names and types of every field."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'the config'} must be a table, not {_kind(raw)}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is MethodConfig:
        name = raw.get("name", MethodConfig.name)
        if not isinstance(name, str):
            raise ConfigError(f"method.name must be a string, not {_kind(name)}.")
        options = {k: v for k, v in raw.items() if k != "name"}
        return MethodConfig(name=name, options=options)  # type: ignore[return-value]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key {key!r}; the keys here are: {known}.")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        values[name] = coerce(hints[name], value, key=key)
    return cls(**values)


def coerce(hint: Any, value: Any, *, key: str) -> Any:
    """Check ``value`` against type ``hint`` (ints are accepted where floats are expected)."""
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_dict(hint, value, where=key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, not {_kind(value)} {value!r}.")
        member = get_args(hint)[0]
        return tuple(coerce(member, item, key=f"{key}[{i}]") for i, item in enumerate(value))
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{key} must be one of {options}, not {value!r}.")
        return value
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(hint) if a is not type(None)]
        if value is None or (value == "" and str in members):
            return None
        return coerce(members[0], value, key=key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {_kind(value)} {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, not {_kind(value)} {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, not {_kind(value)} {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, not {value!r}.")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, not {_kind(value)} {value!r}.")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def check(config: Config) -> None:
    """The checks :func:`load` makes, for a :class:`Config` built in Python: the type of every
    field, then :func:`validate`.

    Raises:
        ConfigError: A field is of the wrong type or out of range.
    """
    _check_fields(config, where="")
    validate(config)


def _check_fields(instance: DataclassInstance, *, where: str) -> None:
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        key = f"{where}.{field.name}" if where else field.name
        value = getattr(instance, field.name)
        if isinstance(instance, MethodConfig) and field.name == "options":
            continue  # the method's own options are checked when the method resolves them
        if dataclasses.is_dataclass(hints[field.name]) and dataclasses.is_dataclass(value):
            _check_fields(value, where=key)  # type: ignore[arg-type]
        else:
            coerce(hints[field.name], value, key=key)


def validate(config: Config) -> None:
    """Range checks that types alone cannot express."""
    data, fed, ev, model = config.data, config.federation, config.evaluation, config.model
    ckpt, faults, val = config.checkpoint, config.faults, config.validation
    checks: list[tuple[bool, str]] = [
        (config.seed >= 0, f"seed must be a non-negative integer, not {config.seed}."),
        (
            config.threads >= 0,
            f"threads must be >= 0 (0 means PyTorch's default), not {config.threads}.",
        ),
        (data.alpha > 0, f"data.alpha must be > 0, not {data.alpha}."),
        (data.classes_per_client >= 1, "data.classes_per_client must be at least 1."),
        (data.min_client_size >= 1, "data.min_client_size must be at least 1."),
        (data.train_subset >= 0, "data.train_subset must be >= 0 (0 means the whole set)."),
        (data.test_subset >= 0, "data.test_subset must be >= 0 (0 means the whole set)."),
        (
            data.partition != "file" or data.train_subset == 0,
            "data.train_subset cannot be combined with a split file, whose indices refer to the "
            "whole training set; set data.train_subset = 0.",
        ),
        (
            data.partition != "file" or data.split_file is not None,
            "data.partition = 'file' needs data.split_file (a JSON list of index lists).",
        ),
        (
            data.name != "npz" or data.path is not None or data.partition == "clients",
            "data.name = 'npz' needs data.path, an .npz file of x_train, y_train, x_test, y_test.",
        ),
        (
            data.name != "folder" or data.path is not None or data.partition == "clients",
            "data.name = 'folder' needs data.path, a folder of PNG or JPEG images or a tar archive "
            "of one.",
        ),
        (data.image_size >= 1, f"data.image_size must be at least 1, not {data.image_size}."),
        # A built-in dataset keeps its own side (32, or 28 unpadded): only folders are resized,
        # and a folder evaluated beside a built-in set must come out that side too.
        (
            data.name in ("folder", "npz")
            or data.image_size == 32
            or (data.image_size == 28 and not data.pad_to_32),
            f"data.image_size = {data.image_size} sizes the images of a folder, but "
            f"{data.name}'s images keep their own size (32x32); remove data.image_size or use "
            "data.name = 'folder'.",
        ),
        (
            not data.clients or data.partition == "clients",
            "data.clients lists one dataset per client and needs data.partition = 'clients'.",
        ),
        (
            data.partition != "clients" or data.name in ("folder", "npz"),
            "data.partition = 'clients' reads each client's own files; set data.name = 'folder' "
            "(or 'npz').",
        ),
        # Where the sites are is checked when they are read: a Flower server has none of them.
        (
            not data.clients or len(data.clients) == fed.num_clients,
            f"data.clients lists {len(data.clients)} datasets but federation.num_clients is "
            f"{fed.num_clients}; make them equal (one client per site).",
        ),
        (
            data.partition != "clients" or data.train_subset == 0,
            "data.train_subset cannot be combined with data.partition = 'clients', where each "
            "client trains on all of its own images; set data.train_subset = 0.",
        ),
        (model.width >= 0, "model.width must be >= 0 (0 means the encoder's default)."),
        (model.projector_hidden >= 1, "model.projector_hidden must be at least 1."),
        (model.projector_out >= 0, "model.projector_out must be >= 0 (0 means the feature size)."),
        (
            model.init_projector is None or model.init_from is not None,
            "model.init_projector needs model.init_from (the run or file to start from).",
        ),
        (
            fed.num_clients >= 1,
            f"federation.num_clients must be at least 1, not {fed.num_clients}.",
        ),
        (0 < fed.fraction <= 1, f"federation.fraction must be in (0, 1], not {fed.fraction}."),
        (fed.rounds >= 1, f"federation.rounds must be at least 1, not {fed.rounds}."),
        (
            fed.local_epochs >= 1,
            f"federation.local_epochs must be at least 1, not {fed.local_epochs}.",
        ),
        (fed.batch_size >= 2, f"federation.batch_size must be at least 2, not {fed.batch_size}."),
        (fed.lr > 0, f"federation.lr must be > 0, not {fed.lr}."),
        (0 <= fed.momentum < 1, f"federation.momentum must be in [0, 1), not {fed.momentum}."),
        (fed.weight_decay >= 0, f"federation.weight_decay must be >= 0, not {fed.weight_decay}."),
        (ev.every >= 0, "evaluation.every must be >= 0 (0 means only at the end)."),
        (ev.knn_k >= 1, "evaluation.knn_k must be at least 1."),
        (ev.knn_temperature > 0, "evaluation.knn_temperature must be > 0."),
        (ev.linear_epochs >= 0, "evaluation.linear_epochs must be >= 0 (0 means no probe)."),
        (ev.linear_lr > 0, "evaluation.linear_lr must be > 0."),
        (ev.linear_batch_size >= 1, "evaluation.linear_batch_size must be at least 1."),
        (ev.metrics_samples >= 2, "evaluation.metrics_samples must be at least 2."),
        (ev.metrics_per_client >= 2, "evaluation.metrics_per_client must be at least 2."),
        (ev.batch_size >= 1, "evaluation.batch_size must be at least 1."),
        (ckpt.every >= 0, "checkpoint.every must be >= 0 (0 means no checkpoints)."),
        (ckpt.keep >= 1, "checkpoint.keep must be at least 1."),
        *(
            (0 <= getattr(faults, name) <= 1, f"faults.{name} must be in [0, 1].")
            for name in ("crash", "straggle", "drop")
        ),
        (faults.min_clients >= 1, "faults.min_clients must be at least 1."),
        (
            val.max_norm_ratio == 0 or val.max_norm_ratio > 1,
            "validation.max_norm_ratio must be 0 (off) or greater than 1.",
        ),
        (val.min_peers >= 1, "validation.min_peers must be at least 1."),
        (
            _valid_device(config.device),
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {config.device!r}.",
        ),
    ]
    checks += _privacy_checks(config)
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    parse_backends(config.tracking.backends)


def parse_backends(text: str) -> tuple[str, ...]:
    """The backend names of ``tracking.backends`` (comma-separated), checked.

    Raises:
        ConfigError: A name is not tensorboard, wandb or mlflow.
    """
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in TRACKING_BACKENDS:
            raise ConfigError(
                f"tracking.backends names {name!r}; choose from {', '.join(TRACKING_BACKENDS)} "
                '(comma-separated, e.g. "tensorboard,mlflow").'
            )
    return tuple(dict.fromkeys(names))


def _private_defaults(raw: dict[str, Any]) -> None:
    """Fill in the defaults that depend on ``privacy.dp``: with DP on, the norm check
    (``validation.max_norm_ratio``) is off unless the config sets it."""
    privacy = raw.get("privacy")
    validation = raw.get("validation", {})
    if not isinstance(privacy, Mapping) or privacy.get("dp", "off") == "off":
        return
    if isinstance(validation, Mapping) and "max_norm_ratio" not in validation:
        raw["validation"] = {**validation, "max_norm_ratio": 0.0}


def _privacy_checks(config: Config) -> list[tuple[bool, str]]:
    """Checks of the ``[privacy]`` table: the ranges always (a value out of range is a mistake
    even while DP is off), how the settings combine when DP is on."""
    dp = config.privacy
    noise = dp.noise_multiplier
    ranges = [
        (dp.clip_norm >= 0, "privacy.clip_norm must be >= 0 (0 means no clipping)."),
        (noise is None or noise >= 0, "privacy.noise_multiplier must be >= 0."),
        (dp.target_epsilon >= 0, "privacy.target_epsilon must be >= 0 (0 means no budget)."),
        (0 < dp.delta < 1, "privacy.delta must be in (0, 1)."),
        (0 < dp.target_quantile < 1, "privacy.target_quantile must be in (0, 1)."),
        (dp.clip_lr >= 0, "privacy.clip_lr must be >= 0."),
        (dp.weight_cap >= 0, "privacy.weight_cap must be >= 0 (0 means no cap)."),
        (
            dp.count_noise_multiplier is None or dp.count_noise_multiplier > 0,
            "privacy.count_noise_multiplier must be > 0.",
        ),
        (0.5 <= dp.min_replies <= 1, "privacy.min_replies must be in [0.5, 1]."),
    ]
    if dp.dp == "off":
        return ranges
    return [
        *ranges,
        (
            noise is not None or dp.target_epsilon > 0,
            "privacy.dp needs privacy.noise_multiplier or privacy.target_epsilon (the noise is "
            "then calibrated to it).",
        ),
        (
            dp.clip_norm > 0 or noise == 0,
            "privacy.clip_norm = 0 (no clipping) is only allowed with privacy.noise_multiplier = "
            "0: noise is measured in units of the clip norm.",
        ),
        (
            dp.dp != "adaptive" or dp.clip_norm > 0,
            "adaptive clipping needs an initial privacy.clip_norm > 0.",
        ),
        (
            config.validation.max_norm_ratio == 0,
            "the norm check (validation.max_norm_ratio) lets one client's update decide whether "
            "another's is averaged, which breaks differential privacy's sensitivity bound; set "
            "validation.max_norm_ratio = 0 with privacy.dp.",
        ),
        (
            dp.weighting != "batches" or dp.weight_cap > 0,
            "privacy.weighting = 'batches' with differential privacy needs a public cap on the "
            "weights (privacy.weight_cap, in local batches), or the noise would have to grow with "
            "the largest client; set it or use privacy.weighting = 'uniform'.",
        ),
        (
            config.faults.min_clients == 1,
            "faults.min_clients skips a round by the number of replies, which differential "
            "privacy cannot allow (whether one client replied would decide what is released); "
            "set faults.min_clients = 1 with privacy.dp.",
        ),
        *_distributed_checks(config),
    ]


def _distributed_checks(config: Config) -> list[tuple[bool, str]]:
    """What distributed DP (``privacy.mode = "distributed"``) cannot combine with."""
    dp = config.privacy
    if dp.mode != "distributed":
        return []
    return [
        (
            dp.dp == "fixed",
            "adaptive clipping counts on the server how many updates fit the clip norm, which "
            "distributed DP's secure aggregation hides; use privacy.dp = 'fixed' with "
            "privacy.mode = 'distributed'.",
        ),
        (
            dp.clip_norm > 0,
            "distributed DP needs privacy.clip_norm > 0 (each client clips its own update, and "
            "SecAgg+'s quantisation range is set from it).",
        ),
        (
            config.federation.sampling == "fixed" or config.federation.fraction >= 1,
            "distributed DP runs under SecAgg+, whose cohort and noise shares need a fixed "
            "cohort size; set federation.sampling = 'fixed'.",
        ),
    ]


def _valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a table.")
        node = child
    node[parts[-1]] = value


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def _kind(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)
