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
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedssd import config as config_module
from fedssd.checkpoint import (
    Checkpoint,
    check_model_state,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    run_identity,
    save_checkpoint,
)
from fedssd.config import Config, DataConfig
from fedssd.data.augment import SSL_AUGMENT, AugmentConfig
from fedssd.data.datasets import DATASET_NAMES, ImageDataset, load_dataset
from fedssd.data.partition import label_histogram, make_partition, subset_indices
from fedssd.errors import ConfigError, DataError
from fedssd.federation.client import LocalResult, LocalSettings
from fedssd.federation.evaluate import evaluate_model, knn_monitor
from fedssd.federation.privacy import check_private_method, make_aggregator, privacy_summary
from fedssd.federation.simulator import Callback, ClientCallback, Guards, Schedule, run_rounds
from fedssd.federation.store import ClientStore
from fedssd.methods import MethodContext, build_method, option_dict
from fedssd.methods.protocol import ExtendsModel, Method
from fedssd.methods.server import load_server_state, server_state
from fedssd.models import SSLModel, build_model
from fedssd.outputs import (
    append_jsonl,
    check_run_dir,
    jsonable,
    prepare_run_dir,
    save_model,
    write_json,
    write_text_atomic,
)
from fedssd.runtime import tune_malloc
from fedssd.seeding import EVALUATION, EXTRAS_INIT, MODEL_INIT, SUBSET, derive_seed, numpy_rng

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
    if config.data.name not in DATASET_NAMES:
        raise ConfigError(
            f"unknown dataset data.name = {config.data.name!r}; choose one of "
            f"{', '.join(DATASET_NAMES)}."
        )
    with torch.device("meta"):
        probe = _build_model(config, in_channels=3)
    context = MethodContext(
        num_clients=config.federation.num_clients,
        feature_dim=probe.feature_dim,
        embed_dim=probe.embed_dim,
        seed=config.seed,
        device=torch.device("cpu"),
    )
    method = build_method(config.method.name, config.method.options, context)
    if config.privacy.dp != "off":
        check_private_method(method)
        make_aggregator(config)  # a target epsilon no noise can meet fails here


def load_data(data: DataConfig, *, log: Log) -> ImageDataset:
    """Read the dataset ``data`` names, with its location, download and format options."""
    return load_dataset(
        data.name,
        path=data.path,
        root=data.root,
        download=data.download,
        pad_to_32=data.pad_to_32,
        rgb=data.rgb,
        log=log,
    )


def data_subsets(config: Config, dataset: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training pool and of the test images: the stratified subsets of
    ``data.train_subset`` and ``data.test_subset`` drawn from the run seed, or all images."""
    data = config.data
    labels = dataset.y_train.numpy()
    pool = np.arange(labels.shape[0])
    if 0 < data.train_subset < labels.shape[0]:
        pool = subset_indices(labels, size=data.train_subset, rng=numpy_rng(config.seed, SUBSET, 0))
    test_labels = dataset.y_test.numpy()
    test = np.arange(test_labels.shape[0])
    if 0 < data.test_subset < test_labels.shape[0]:
        test = subset_indices(
            test_labels, size=data.test_subset, rng=numpy_rng(config.seed, SUBSET, 1)
        )
    return pool, test


def prepare_data(config: Config, *, log: Log) -> FederatedData:
    """Load the dataset and split its training set over the clients (pure given the config)."""
    data = config.data
    dataset = load_data(data, log=log)
    pool, test_indices = data_subsets(config, dataset)
    parts = make_partition(
        dataset.y_train.numpy()[pool],
        scheme=data.partition,
        num_clients=config.federation.num_clients,
        seed=config.seed,
        alpha=data.alpha,
        classes_per_client=data.classes_per_client,
        split_file=data.split_file,
        min_size=data.min_client_size,
    )
    client_indices = [pool[p] for p in parts]
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


@dataclasses.dataclass
class Experiment:
    """Everything a run is made of, built from a config (shared by the simulator and Flower).

    Attributes:
        config: The resolved configuration.
        data: The dataset and its split over clients.
        device: Where training runs.
        augment: The two-view augmentation.
        global_model: The global model (initial weights from the run seed).
        client_model: The one reused client model.
        method: The federated method.
        schedule: Rounds, sampling and learning rates.
        settings: Local training settings.
        guards: Simulated faults and update validation.
        images: ``(n, c, height, width)`` uint8 training images on ``device``.
        client_indices: One int64 index tensor per client on ``device``.
    """

    config: Config
    data: FederatedData
    device: torch.device
    augment: AugmentConfig
    global_model: SSLModel
    client_model: SSLModel
    method: Method
    schedule: Schedule
    settings: LocalSettings
    guards: Guards
    images: torch.Tensor
    client_indices: list[torch.Tensor]


def build_experiment(config: Config, *, log: Log) -> Experiment:
    """Load the data and build the models, the method and the schedules of a resolved config."""
    device = select_device(config.device)
    data = prepare_data(config, log=log)
    in_channels = data.dataset.x_train.shape[1]
    global_model = make_model(config, in_channels, device)
    client_model = make_model(config, in_channels, device)
    method = build_method(
        config.method.name,
        config.method.options,
        MethodContext(
            num_clients=config.federation.num_clients,
            feature_dim=global_model.feature_dim,
            embed_dim=global_model.embed_dim,
            seed=config.seed,
            device=device,
        ),
    )
    for model in (global_model, client_model):
        attach_extras(model, method, seed=config.seed)
    fed = config.federation
    augment = data.augmentation()
    return Experiment(
        config=config,
        data=data,
        device=device,
        augment=augment,
        global_model=global_model,
        client_model=client_model,
        method=method,
        schedule=Schedule(
            num_clients=fed.num_clients,
            fraction=fed.fraction,
            rounds=fed.rounds,
            lr=fed.lr,
            lr_schedule=fed.lr_schedule,
            seed=config.seed,
        ),
        settings=LocalSettings(
            epochs=fed.local_epochs,
            batch_size=fed.batch_size,
            lr=fed.lr,
            momentum=fed.momentum,
            weight_decay=fed.weight_decay,
            augment=augment,
            autocast_dtype=autocast_dtype(config.precision, device),
        ),
        guards=Guards(
            faults=config.faults, validation=config.validation, privacy=make_aggregator(config)
        ),
        images=data.dataset.x_train.to(device),
        client_indices=[torch.from_numpy(p).long().to(device) for p in data.client_indices],
    )


def attach_extras(model: SSLModel, method: Method, *, seed: int) -> None:
    """Give ``model`` the method's extra modules (predictor, centroids), seeded from the run."""
    if not isinstance(method, ExtendsModel):
        return
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, EXTRAS_INIT))
        modules = method.extra_modules()
    for name, module in modules.items():
        model.extras[name] = module.to(device)


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
        out: Folder for ``config.toml``, ``metrics.jsonl``, ``partition.json``, ``summary.json``,
            ``model.safetensors`` and ``checkpoints/``; None writes nothing.
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
    experiment = build_experiment(cfg, log=say)
    # Everything the user can get wrong has been checked: only now is the output folder touched.
    out_dir = prepare_run_dir(Path(out), overwrite=overwrite) if out is not None else None
    if out_dir is not None:
        write_header(out_dir, cfg, experiment.data)
    return _run(
        experiment, out_dir=out_dir, resume_from=None, started=started, say=say, verbose=verbose
    )


def resume(
    run_dir: str | Path, *, log: Log | None = stderr_log, verbose: bool = False
) -> RunResult:
    """Continue an interrupted run from its newest checkpoint.

    The run's own ``config.toml`` is used. On the CPU, a resumed run ends with the same global
    weights, bit for bit, and the same metrics as the run would have without the interruption.

    Raises:
        fedssd.errors.FedSSDError: The folder is not an unfinished run with a checkpoint, or the
            checkpoint is corrupted or belongs to another run.
    """
    started = time.perf_counter()
    say: Log = log or (lambda _message: None)
    out_dir = Path(run_dir)
    config_path = out_dir / "config.toml"
    if not config_path.is_file():
        raise ConfigError(f"{out_dir} is not a fedssd run folder (it has no config.toml).")
    if (out_dir / "summary.json").exists():
        raise ConfigError(
            f"the run in {out_dir} has finished (summary.json exists); nothing to resume."
        )
    cfg = load_config(config_path)
    remove_partial_checkpoints(out_dir)
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        raise ConfigError(
            f"{out_dir} has no checkpoint to resume from (the run stopped before its first one, "
            f"written every {cfg.checkpoint.every} rounds); start it again with --overwrite."
        )
    saved, path = _newest_readable(checkpoints, say)
    if saved.identity != run_identity(config_module.to_dict(cfg)):
        raise DataError(
            f"checkpoint {path} was written by a different configuration than "
            f"{config_path}; resume only the run that wrote it."
        )
    check_setup(cfg)
    experiment = build_experiment(cfg, log=say)
    check_model_state(experiment.global_model.state_dict(), saved.model, where=path)
    experiment.global_model.load_state_dict(saved.model)
    load_server_state(experiment.method, saved.server)
    say(f"resuming {out_dir} after round {saved.rounds_done} of {cfg.federation.rounds}")
    # The metrics file is rewritten from the checkpoint: lines of rounds after it are redone.
    write_text_atomic(
        out_dir / "metrics.jsonl",
        "".join(json.dumps(jsonable(record)) + "\n" for record in saved.history),
    )
    return _run(
        experiment, out_dir=out_dir, resume_from=saved, started=started, say=say, verbose=verbose
    )


def _newest_readable(checkpoints: Sequence[Path], say: Log) -> tuple[Checkpoint, Path]:
    """The newest checkpoint that passes verification; older ones are tried when a newer one is
    damaged (e.g. by a power cut), each skipped one reported.

    Raises:
        DataError: None of them can be read (the newest one's problem is reported).
    """
    first_error: DataError | None = None
    for path in reversed(checkpoints):
        try:
            saved = load_checkpoint(path)
        except DataError as error:
            first_error = first_error or error
            say(f"warning: {error} Trying the checkpoint before it.")
            continue
        return saved, path
    assert first_error is not None
    raise first_error


def _run(
    experiment: Experiment,
    *,
    out_dir: Path | None,
    resume_from: Checkpoint | None,
    started: float,
    say: Log,
    verbose: bool,
) -> RunResult:
    """The round loop, the final evaluation and the final files of a built experiment."""
    cfg, data = experiment.config, experiment.data
    tune_malloc()
    views = data.evaluation_views()
    sizes = [len(p) for p in data.client_indices]
    say(
        f"{data.dataset.name}: {sum(sizes)} training images over {len(sizes)} clients "
        f"(smallest {min(sizes)}, largest {max(sizes)}), {len(data.test_indices)} test images"
    )
    fed = cfg.federation
    say(
        f"training {cfg.method.name} on {experiment.device.type}: {fed.rounds} rounds, "
        f"{fed.local_epochs} local epochs, {fed.num_clients} clients at fraction {fed.fraction}"
    )
    store = resume_from.store if resume_from is not None else ClientStore()
    history = list(resume_from.history) if resume_from is not None else []
    callbacks = round_callbacks(cfg, views, experiment.device, out_dir, say)
    if out_dir is not None and cfg.checkpoint.every:
        callbacks.append(checkpointer(cfg, out_dir, experiment.method, store, history))
    history = run_rounds(
        global_model=experiment.global_model,
        client_model=experiment.client_model,
        method=experiment.method,
        images=experiment.images,
        client_indices=experiment.client_indices,
        schedule=experiment.schedule,
        settings=experiment.settings,
        store=store,
        guards=experiment.guards,
        start_round=len(history),
        history=history,
        callbacks=callbacks,
        on_client=_client_progress(cfg.method.name, fed.rounds, say) if verbose else None,
    )
    return finish_run(experiment, history, views=views, out_dir=out_dir, started=started, say=say)


def finish_run(
    experiment: Experiment,
    history: list[dict[str, Any]],
    *,
    views: EvaluationViews,
    out_dir: Path | None,
    started: float,
    say: Log,
) -> RunResult:
    """Evaluate the final global model and write ``model.safetensors``, the server state and
    ``summary.json``."""
    cfg = experiment.config
    train_seconds = time.perf_counter() - started
    say("evaluating the final global model (kNN, linear probe, uniformity, alignment, rank)")
    model = experiment.global_model
    summary = {
        "method": cfg.method.name,
        "dataset": experiment.data.dataset.name,
        **final_evaluation(
            cfg, views, model, augment=experiment.augment, device=experiment.device, log=say
        ),
        "rounds": cfg.federation.rounds,
        "skipped_rounds": sum(1 for record in history if record.get("skipped")),
        "failed_clients": sum(len(record.get("failed", {})) for record in history),
        **privacy_summary(history),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
    }
    if out_dir is not None:
        save_model(out_dir / "model.safetensors", model.state_dict())
        method_state = server_state(experiment.method)
        if method_state:
            save_model(out_dir / "server_state.safetensors", method_state)
        write_json(out_dir / "summary.json", summary)
    return RunResult(config=cfg, history=history, summary=summary, out_dir=out_dir, model=model)


def checkpointer(
    config: Config,
    out_dir: Path,
    method: Method,
    store: ClientStore,
    history: list[dict[str, Any]],
) -> Callback:
    """A round callback writing a checkpoint every ``checkpoint.every`` rounds and at the end."""
    identity = run_identity(config_module.to_dict(config))
    every, rounds = config.checkpoint.every, config.federation.rounds

    def save(record: dict[str, Any], model: nn.Module) -> None:
        done = int(record["round"])
        if done % every and done != rounds:
            return
        checkpoint = Checkpoint(
            rounds_done=done,
            model={k: v.detach() for k, v in model.state_dict().items()},
            server=server_state(method),
            store=store,
            history=history[:done],
            identity=identity,
        )
        save_checkpoint(out_dir, checkpoint, keep=config.checkpoint.keep)

    return save


def write_header(out_dir: Path, config: Config, data: FederatedData) -> None:
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


def round_callbacks(
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
