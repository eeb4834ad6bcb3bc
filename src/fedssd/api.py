"""The one call that runs an experiment: :func:`train`.

It composes the parts (data, partition, model, method, simulator, evaluation) and writes the run's
files. The CLI is a thin layer over it.

Example:
    >>> import fedssd
    >>> result = fedssd.train("configs/smoke.toml", overrides=["federation.rounds=2"], out="runs/x")
    >>> result.summary["knn_acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedssd import config as config_module
from fedssd.config import Config
from fedssd.data.augment import SSL_AUGMENT, AugmentConfig
from fedssd.data.datasets import ImageDataset, load_dataset
from fedssd.data.partition import label_histogram, make_partition, subset_indices
from fedssd.errors import ConfigError, DataError
from fedssd.federation.client import LocalResult, LocalSettings
from fedssd.federation.evaluate import evaluate_model, knn_monitor
from fedssd.federation.simulator import Callback, ClientCallback, Schedule, run_rounds
from fedssd.methods import MethodContext, build_method, option_dict
from fedssd.models import SSLModel, build_model
from fedssd.outputs import (
    append_jsonl,
    check_run_dir,
    prepare_run_dir,
    save_model,
    write_json,
    write_text_atomic,
)
from fedssd.seeding import EVALUATION, MODEL_INIT, SUBSET, derive_seed, numpy_rng

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`train` returns.

    Attributes:
        config: The fully resolved configuration (method defaults filled in).
        history: One record per round (the lines of ``metrics.jsonl``).
        summary: The final evaluation (the content of ``summary.json``).
        out_dir: Where the files were written, or None when nothing was written.
        model: The final global model.
    """

    config: Config
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path | None
    model: SSLModel


@dataclasses.dataclass(frozen=True)
class EvaluationViews:
    """What the evaluations look at.

    Attributes:
        train_images: ``(n, c, height, width)`` uint8, every client's training images.
        train_labels: ``(n,)`` their labels.
        train_clients: ``(n,)`` the client holding each of them.
        test_images: ``(m, c, height, width)`` uint8 test images.
        test_labels: ``(m,)`` their labels.
        num_classes: Number of classes.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_clients: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """A dataset split over clients.

    Attributes:
        dataset: The whole dataset (uint8 images on the CPU).
        client_indices: One sorted int64 array of training-set indices per client.
        test_indices: Indices of the test images used for evaluation.
    """

    dataset: ImageDataset
    client_indices: list[np.ndarray]
    test_indices: np.ndarray

    def evaluation_views(self) -> EvaluationViews:
        """The clients' training images (in index order, with their owners) and the test set."""
        owner = np.full(self.dataset.y_train.shape[0], -1, dtype=np.int64)
        for k, part in enumerate(self.client_indices):
            owner[part] = k
        union = torch.from_numpy(np.flatnonzero(owner >= 0))
        test = torch.from_numpy(self.test_indices)
        return EvaluationViews(
            train_images=self.dataset.x_train[union],
            train_labels=self.dataset.y_train[union],
            train_clients=torch.from_numpy(owner)[union],
            test_images=self.dataset.x_test[test],
            test_labels=self.dataset.y_test[test],
            num_classes=self.dataset.num_classes,
        )

    def augmentation(self) -> AugmentConfig:
        """The paper's two-view augmentation, producing views of the images' own size."""
        height, width = self.dataset.x_train.shape[-2:]
        if height != width:
            raise DataError(
                f"{self.dataset.name} images are {height}x{width}; fedssd needs square images "
                "(crop or pad them before saving the dataset)."
            )
        return dataclasses.replace(SSL_AUGMENT, size=int(height))


def resolve(config: Config) -> Config:
    """``config`` with the method's options complete and data paths absolute.

    Raises:
        ConfigError: The method or an option is unknown or out of range.
    """
    options = option_dict(config.method.name, config.method.options)
    data = config.data
    data = dataclasses.replace(
        data,
        path=_absolute(data.path),
        root=_absolute(data.root),
        split_file=_absolute(data.split_file),
    )
    return dataclasses.replace(
        config,
        data=data,
        method=dataclasses.replace(config.method, options=options),
    )


def _absolute(path: str | None) -> str | None:
    """A path made absolute, so that the saved config reruns from any folder."""
    return None if path is None else str(Path(path).expanduser().resolve())


def load_config(config: Config | str | Path, overrides: Sequence[str] = ()) -> Config:
    """A validated, resolved :class:`Config` from a dataclass or a TOML path, with overrides."""
    source = config_module.to_dict(config) if isinstance(config, Config) else Path(config)
    return resolve(config_module.load(source, overrides))


def check_setup(config: Config) -> None:
    """Build the model (without memory) and the method, so that a config they refuse fails
    before any data is read or file written."""
    with torch.device("meta"):
        probe = _build_model(config, in_channels=3)
    context = MethodContext(
        num_clients=config.federation.num_clients,
        feature_dim=probe.feature_dim,
        embed_dim=probe.embed_dim,
        seed=config.seed,
        device=torch.device("cpu"),
    )
    build_method(config.method.name, config.method.options, context)


def prepare_data(config: Config, *, log: Log) -> FederatedData:
    """Load the dataset and split its training set over the clients (pure given the config)."""
    data = config.data
    dataset = load_dataset(
        data.name,
        path=data.path,
        root=data.root,
        download=data.download,
        pad_to_32=data.pad_to_32,
        rgb=data.rgb,
        log=log,
    )
    labels = dataset.y_train.numpy()
    pool = np.arange(labels.shape[0])
    if 0 < data.train_subset < labels.shape[0]:
        pool = subset_indices(labels, size=data.train_subset, rng=numpy_rng(config.seed, SUBSET, 0))
    parts = make_partition(
        labels[pool],
        scheme=data.partition,
        num_clients=config.federation.num_clients,
        seed=config.seed,
        alpha=data.alpha,
        classes_per_client=data.classes_per_client,
        split_file=data.split_file,
        min_size=data.min_client_size,
    )
    client_indices = [pool[p] for p in parts]
    test_labels = dataset.y_test.numpy()
    test_indices = np.arange(test_labels.shape[0])
    if 0 < data.test_subset < test_labels.shape[0]:
        test_indices = subset_indices(
            test_labels, size=data.test_subset, rng=numpy_rng(config.seed, SUBSET, 1)
        )
    return FederatedData(dataset=dataset, client_indices=client_indices, test_indices=test_indices)


def make_model(config: Config, in_channels: int, device: torch.device) -> SSLModel:
    """The initial global model, its weights drawn from the run seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.seed, MODEL_INIT))
        model = _build_model(config, in_channels=in_channels)
    return model.to(device)


def _build_model(config: Config, *, in_channels: int) -> SSLModel:
    return build_model(
        encoder=config.model.encoder,
        in_channels=in_channels,
        width=config.model.width or None,
        projector_hidden=config.model.projector_hidden,
        projector_out=config.model.projector_out or None,
    )


def select_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was asked for but no CUDA device is available; use 'auto'."
        )
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for ``auto``; full precision on the CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def final_evaluation(
    config: Config,
    views: EvaluationViews,
    model: SSLModel,
    *,
    augment: AugmentConfig,
    device: torch.device,
    log: Log,
) -> dict[str, Any]:
    """The final evaluation of ``model`` on the run's data (see :func:`evaluate_model`)."""
    return evaluate_model(
        model,
        train_images=views.train_images,
        train_labels=views.train_labels,
        train_clients=views.train_clients,
        test_images=views.test_images,
        test_labels=views.test_labels,
        num_classes=views.num_classes,
        settings=config.evaluation,
        augment=augment,
        seed=derive_seed(config.seed, EVALUATION),
        device=device,
        log=log,
    )


def stderr_log(message: str) -> None:
    """Progress to standard error (standard output is left for results)."""
    print(message, file=sys.stderr, flush=True)


def train(
    config: Config | str | Path,
    *,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    overwrite: bool = False,
    log: Log | None = stderr_log,
    verbose: bool = False,
) -> RunResult:
    """Run one federated experiment, evaluate the final global model and write the run's files.

    Args:
        config: A :class:`~fedssd.config.Config` or the path of a TOML file.
        overrides: ``dotted.key=value`` strings applied on top (e.g. ``"federation.rounds=5"``).
        out: Folder for ``config.toml``, ``metrics.jsonl``, ``partition.json``, ``summary.json``
            and ``model.safetensors``; None writes nothing.
        overwrite: Replace the files of an earlier run in ``out`` (otherwise that is an error).
        log: Receives progress lines; None for silence.
        verbose: Also log a line after each client's local training.

    Returns:
        The resolved config, per-round history, final summary and the trained model.

    Raises:
        fedssd.errors.FedSSDError: A user-caused problem (config, data), in one sentence.
    """
    started = time.perf_counter()
    say: Log = log or (lambda _message: None)
    cfg = load_config(config, overrides)
    if out is not None:
        check_run_dir(Path(out), overwrite=overwrite)
    check_setup(cfg)
    device = select_device(cfg.device)
    fed_data = prepare_data(cfg, log=say)
    augment = fed_data.augmentation()
    dataset = fed_data.dataset
    global_model = make_model(cfg, dataset.x_train.shape[1], device)
    client_model = make_model(cfg, dataset.x_train.shape[1], device)
    context = MethodContext(
        num_clients=cfg.federation.num_clients,
        feature_dim=global_model.feature_dim,
        embed_dim=global_model.embed_dim,
        seed=cfg.seed,
        device=device,
    )
    method = build_method(cfg.method.name, cfg.method.options, context)

    # Everything the user can get wrong has been checked: only now is the output folder touched.
    out_dir = prepare_run_dir(Path(out), overwrite=overwrite) if out is not None else None
    if out_dir is not None:
        _write_header(out_dir, cfg, fed_data)
    views = fed_data.evaluation_views()
    sizes = [len(p) for p in fed_data.client_indices]
    say(
        f"{dataset.name}: {sum(sizes)} training images over {len(sizes)} clients "
        f"(smallest {min(sizes)}, largest {max(sizes)}), {len(fed_data.test_indices)} test images"
    )
    fed = cfg.federation
    say(
        f"training {cfg.method.name} on {device.type}: {fed.rounds} rounds, "
        f"{fed.local_epochs} local epochs, {fed.num_clients} clients at fraction {fed.fraction}"
    )
    history = run_rounds(
        global_model=global_model,
        client_model=client_model,
        method=method,
        images=dataset.x_train.to(device),
        client_indices=[torch.from_numpy(p).long().to(device) for p in fed_data.client_indices],
        schedule=Schedule(
            num_clients=fed.num_clients,
            fraction=fed.fraction,
            rounds=fed.rounds,
            lr=fed.lr,
            lr_schedule=fed.lr_schedule,
            seed=cfg.seed,
        ),
        settings=LocalSettings(
            epochs=fed.local_epochs,
            batch_size=fed.batch_size,
            lr=fed.lr,
            momentum=fed.momentum,
            weight_decay=fed.weight_decay,
            augment=augment,
            autocast_dtype=autocast_dtype(cfg.precision, device),
        ),
        callbacks=_callbacks(cfg, views, device, out_dir, say),
        on_client=_client_progress(cfg.method.name, fed.rounds, say) if verbose else None,
    )
    train_seconds = time.perf_counter() - started

    say("evaluating the final global model (kNN, linear probe, uniformity, alignment, rank)")
    summary = {
        "method": cfg.method.name,
        "dataset": dataset.name,
        **final_evaluation(cfg, views, global_model, augment=augment, device=device, log=say),
        "rounds": fed.rounds,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    if out_dir is not None:
        save_model(out_dir / "model.safetensors", global_model.state_dict())
        server_state = method.state_dict()
        if server_state:
            save_model(out_dir / "server_state.safetensors", server_state)
        write_json(out_dir / "summary.json", summary)
    return RunResult(
        config=cfg, history=history, summary=summary, out_dir=out_dir, model=global_model
    )


def _write_header(out_dir: Path, config: Config, data: FederatedData) -> None:
    """The files written before training: the resolved config and the partition."""
    write_text_atomic(out_dir / "config.toml", config_module.dumps(config))
    histogram = label_histogram(
        data.dataset.y_train.numpy(), data.client_indices, num_classes=data.dataset.num_classes
    )
    write_json(
        out_dir / "partition.json",
        {
            "scheme": config.data.partition,
            "sizes": [len(p) for p in data.client_indices],
            "label_histogram": histogram.tolist(),
        },
    )


def _callbacks(
    config: Config, views: EvaluationViews, device: torch.device, out_dir: Path | None, say: Log
) -> list[Callback]:
    """The round callbacks: the kNN monitor, the metrics file and the progress line."""
    callbacks: list[Callback] = []
    ev = config.evaluation
    if ev.every:
        callbacks.append(
            knn_monitor(
                every=ev.every,
                last_round=config.federation.rounds,
                bank_images=views.train_images,
                bank_labels=views.train_labels,
                test_images=views.test_images,
                test_labels=views.test_labels,
                num_classes=views.num_classes,
                k=ev.knn_k,
                temperature=ev.knn_temperature,
                batch_size=ev.batch_size,
                device=device,
            )
        )
    if out_dir is not None:
        metrics_path = out_dir / "metrics.jsonl"

        def write_record(record: dict[str, Any], _model: nn.Module) -> None:
            append_jsonl(metrics_path, record)

        callbacks.append(write_record)
    callbacks.append(_progress(config.method.name, config.federation.rounds, say))
    return callbacks


def _client_progress(name: str, rounds: int, say: Log) -> ClientCallback:
    """A per-client progress line, for rounds too long to wait for in silence."""

    def report(round_index: int, position: int, count: int, result: LocalResult) -> None:
        say(
            f"[{name}] round {round_index + 1}/{rounds} client {position + 1}/{count} "
            f"(id {result.client_id}): {result.num_batches} batches, loss {result.loss:.4f}, "
            f"{result.seconds:.1f}s"
        )

    return report


def _progress(name: str, rounds: int, say: Log) -> Callback:
    """A callback printing one line per round with the loss parts and the time left."""
    started = time.perf_counter()

    def report(record: dict[str, Any], _model: nn.Module) -> None:
        done = record["round"]
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (rounds - done)
        parts = " ".join(
            f"{key[5:]} {value:.4f}" for key, value in record.items() if key.startswith("loss_")
        )
        knn = f" | knn {100 * record['knn_acc']:.2f}%" if "knn_acc" in record else ""
        say(
            f"[{name}] round {done}/{rounds} | loss {record['loss']:.4f} ({parts}){knn} "
            f"| {record['seconds']:.1f}s | eta {eta:.0f}s"
        )

    return report
