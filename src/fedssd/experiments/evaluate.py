"""Re-evaluating a finished run with the paper's protocols: ``fedssd eval``.

A run folder written by :func:`fedssd.api.train` holds ``config.toml`` and
``model.safetensors``; :func:`evaluate_run` loads that model and evaluates it again, on the
run's own data or, for transfer, on another dataset (the SSD paper's protocols, docs/evaluation.md):

- ``knn``: weighted kNN (the run's k and temperature) on normalised h, bank = the labelled pool;
- ``linear``: linear probe on frozen, un-normalised h (Adam, the run's probe settings), plus
  ``-L_unif`` and the effective rank of h on the pool (the paper's transfer table reports them);
- ``finetune``: semi-supervised fine-tuning of the encoder on a stratified 1% or 10% of the
  pool (:mod:`fedssd.evaluation.finetune`).

The pool is every client's training image (the run's ``train_subset``, if any) and the test
set the run's (``test_subset``, if any), so ``knn`` and ``linear`` on the run's own data give
the numbers of its ``summary.json``. The result goes to
``<run>/eval/<protocol>[-<labels>][-<epochs>ep][-on-<dataset>[-<npz file stem>]].json``
(:func:`result_name`). This module is the edge that reads and writes run folders; the
evaluations themselves are pure functions in :mod:`fedssd.evaluation`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedssd.api import stderr_log
from fedssd.config import Config, EvaluationConfig
from fedssd.data.datasets import DATASET_NAMES
from fedssd.data.federated import (
    EvaluationViews,
    data_subsets,
    load_data,
    prepare_data,
    run_evaluation_views,
    server_evaluation_views,
)
from fedssd.errors import ConfigError, DataError
from fedssd.evaluation.features import extract_features
from fedssd.evaluation.finetune import FinetuneSettings, finetune, stratified_fraction
from fedssd.evaluation.knn import knn_accuracy
from fedssd.evaluation.linear_probe import linear_probe
from fedssd.evaluation.metrics import representation_metrics
from fedssd.federation.evaluate import label_warning
from fedssd.models import SSLModel
from fedssd.runs.model import load_run, recorded_image_shape
from fedssd.runs.outputs import write_json
from fedssd.runtime import autocast_dtype, cpu_threads, select_device
from fedssd.seeding import EVALUATION, derive_seed, numpy_rng

Log = Callable[[str], None]

PROTOCOLS = ("knn", "linear", "finetune")
LABEL_FRACTIONS = (0.01, 0.1)
"""The labelled fractions of the paper's semi-supervised fine-tuning (FT 1% and FT 10%)."""

# Sub-streams of the run's EVALUATION seed for fine-tuning: which images are labelled, and the
# head's initialisation, shuffling and augmentation.
_FINETUNE_SUBSET = 1
_FINETUNE_TRAIN = 2


def _sites_elsewhere(config: Config) -> bool:
    """Whether the run trained on sites' own images that are not here (a deployment's server:
    the nodes named their data, the config names none)."""
    return config.data.partition == "clients" and not config.data.clients and not config.data.path


def result_name(
    protocol: str,
    labels: float | None,
    eval_data: str | None,
    *,
    epochs: int | None = None,
    eval_path: str | Path | None = None,
) -> str:
    """The file name of a result:
    ``<protocol>[-<labels>][-<epochs>ep][-on-<eval_data>[-<file stem>]].json``.

    Every setting that changes the result is in the name, so that results never overwrite each
    other: ``epochs`` when they are not the protocol's default (the caller passes None for the
    default), and for ``npz`` transfer data the file's stem.
    """
    name = protocol
    if labels is not None:
        name += f"-{labels:g}"
    if epochs is not None:
        name += f"-{epochs}ep"
    if eval_data is not None:
        name += f"-on-{eval_data}"
        if eval_data == "npz" and eval_path is not None:
            stem = "".join(c if c.isalnum() or c in "_.+" else "_" for c in Path(eval_path).stem)
            name += f"-{stem}"
    return name + ".json"


def _default_epochs(protocol: str, config: Config) -> int:
    """The epochs a protocol uses without ``--epochs``: the run's probe epochs (the default
    probe's when the run had none) or the paper's fine-tuning epochs."""
    if protocol == "finetune":
        return FinetuneSettings().epochs
    return config.evaluation.linear_epochs or EvaluationConfig().linear_epochs


def _check_arguments(
    protocol: str,
    labels: float | None,
    eval_data: str | None,
    eval_path: str | None,
    epochs: int | None,
) -> None:
    """Refuse an impossible request before any file is read."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"Unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}.")
    fractions = ", ".join(f"{f:g}" for f in LABEL_FRACTIONS)
    if protocol == "finetune" and labels not in LABEL_FRACTIONS:
        raise ConfigError(
            f"Fine-tuning needs the labelled fraction: --labels {fractions.replace(', ', ' or ')} "
            f"(the paper's 1% and 10%; labels= in Python), got {labels}."
        )
    if protocol != "finetune" and labels is not None:
        raise ConfigError(
            f"The {protocol} protocol uses every labelled image; pass --labels only with finetune."
        )
    if epochs is not None and (protocol == "knn" or epochs < 1):
        raise ConfigError(
            f"epochs must be a positive number of linear-probe or fine-tuning epochs (kNN has "
            f"none), got {epochs} for {protocol}."
        )
    if eval_data is not None and eval_data not in DATASET_NAMES:
        raise ConfigError(
            f"Unknown evaluation dataset {eval_data!r}; choose one of {', '.join(DATASET_NAMES)}."
        )
    if eval_path is not None and eval_data is None:
        raise ConfigError(
            "An evaluation path was given without an evaluation dataset; name it with eval_data "
            "(--eval-data)."
        )
    if eval_data == "npz" and eval_path is None:
        raise ConfigError(
            "Evaluation on an npz dataset needs eval_path (--eval-path) set to the .npz file."
        )


def _own_views(config: Config, log: Log) -> EvaluationViews:
    """The run's own pool and test set (or the server's evaluation set), exactly as its final
    evaluation saw them.

    Raises:
        ConfigError: The run was evaluated federated, so no labelled set is in one place.
    """
    if _sites_elsewhere(config):
        # A deployment: the sites' images stay on the sites; only the server's set is here.
        views = server_evaluation_views(config, log=log)
        if views is None:
            raise ConfigError(
                "This run trained on the sites' own images, which stay on the sites; evaluate "
                "it on a labelled set with eval_data and eval_path (--eval-data folder "
                "--eval-path DIR, or npz)."
            )
        return views
    views = run_evaluation_views(config, prepare_data(config, log=log), log=log)
    if views is None:
        raise ConfigError(
            "This run was evaluated on each client's own images (no labelled set in one place); "
            "evaluate it on a labelled dataset with eval_data (--eval-data)."
        )
    return views


def _transfer_views(
    config: Config, eval_data: str, eval_path: str | None, log: Log
) -> tuple[EvaluationViews, Config]:
    """Another dataset's training set (the pool, one client) and test set, with the run's data
    options (root, download, padding, channels, subset sizes); a set without test images is
    split into a stratified 80 % bank and 20 % queries."""
    path = None if eval_path is None else str(Path(eval_path).expanduser().resolve())
    data = dataclasses.replace(config.data, name=eval_data, path=path)
    transfer = dataclasses.replace(config, data=data)
    dataset = load_data(data, log=log)
    if dataset.x_test.shape[0] == 0 and path is not None:
        # A folder or .npz without test images: a stratified bank and queries, as a server's
        # evaluation set is split.
        evaluation = dataclasses.replace(config.evaluation, data=path)
        views = server_evaluation_views(dataclasses.replace(config, evaluation=evaluation), log=log)
        assert views is not None
        return views, transfer
    pool, test = data_subsets(transfer, dataset)
    pool_t, test_t = torch.from_numpy(pool), torch.from_numpy(test)
    views = EvaluationViews(
        train_images=dataset.x_train[pool_t],
        train_labels=dataset.y_train[pool_t],
        train_clients=torch.zeros(pool.shape[0], dtype=torch.long),
        test_images=dataset.x_test[test_t],
        test_labels=dataset.y_test[test_t],
        num_classes=dataset.num_classes,
    )
    return views, transfer


def _check_shape(
    config: Config, model: SSLModel, views: EvaluationViews, eval_data: str, run_dir: Path
) -> None:
    """Refuse images the model was not trained on (another channel count or size)."""
    shape = tuple(views.train_images.shape[1:])
    channels = _in_channels(model)
    if shape[0] != channels:
        raise DataError(
            f"{eval_data} images have {shape[0]} channel(s) but the model was trained on "
            f"{channels}; set data.rgb in the run's config.toml or convert the evaluation data."
        )
    recorded = recorded_image_shape(run_dir)
    if recorded is not None:
        _check_side(eval_data, shape, recorded)
        return
    if _sites_elsewhere(config):
        raise DataError(
            f"{run_dir}/partition.json does not say the size of the images the run trained on "
            "(a run written by an earlier fedssd) and the sites' images are not here; add "
            '"image_shape": [channels, height, width] to it and retry.'
        )
    # An older run does not record its image side, so its own data is read again (never
    # downloaded).
    try:
        offline = dataclasses.replace(config, data=dataclasses.replace(config.data, download=False))
        if config.data.partition == "clients":
            # Real sites: their images, laid end to end.
            source = prepare_data(offline, log=lambda _message: None).dataset
        else:
            source = load_data(offline.data, log=lambda _message: None)
    except DataError:
        raise DataError(
            f"Transfer evaluation reads the run's own {config.data.name} data to learn the image "
            "size the model was trained on, and it could not be found; make it available "
            "(data.path or data.root in the run's config.toml) and retry."
        ) from None
    _check_side(eval_data, shape, tuple(source.x_train.shape[1:]))


def _check_side(eval_data: str, shape: tuple[int, ...], trained: tuple[int, ...]) -> None:
    if trained[1:] != shape[1:]:
        raise DataError(
            f"{eval_data} images are {shape[1]}x{shape[2]} but the model was trained on "
            f"{trained[1]}x{trained[2]} images; resize or pad the evaluation data to that size."
        )


def _in_channels(model: SSLModel) -> int:
    first_conv = next(p for p in model.encoder.parameters() if p.dim() == 4)
    return int(first_conv.shape[1])


def evaluate_run(
    run_dir: Path,
    protocol: str,
    *,
    labels: float | None = None,
    eval_data: str | None = None,
    eval_path: str | None = None,
    epochs: int | None = None,
    device: str | None = None,
    threads: int | None = None,
    log: Log | None = stderr_log,
) -> dict[str, Any]:
    """Evaluate a finished run's model with one protocol and save the result in the run folder.

    Args:
        run_dir: A folder written by :func:`fedssd.api.train`.
        protocol: ``knn``, ``linear`` or ``finetune``.
        labels: The labelled fraction for ``finetune``: 0.01 or 0.1 (the paper's 1% and 10%).
        eval_data: Another dataset to evaluate on (transfer); None uses the run's own data.
        eval_path: A file or folder holding ``eval_data`` (required for ``npz``).
        epochs: Linear-probe or fine-tuning epochs instead of the run's probe setting or the
            paper's 200 fine-tuning epochs.
        device: ``auto``, ``cpu``, ``cuda``...; None uses the run's ``device``.
        threads: CPU threads (None: the run's ``threads`` setting; 0: PyTorch's default).
        log: Receives progress lines; None for silence.

    Returns:
        The result as written to ``run_dir/eval/`` under the name :func:`result_name` gives
        (the result's ``file``):
        ``knn_acc``; or ``linear_probe_acc``, ``linear_probe_train_acc``,
        ``uniformity_global`` and ``effective_rank``; or ``finetune_best_acc``,
        ``finetune_last_acc``, ``finetune_best_epoch``, ``finetune_evaluations``,
        ``labels`` and ``labelled_images``; always ``protocol``, ``method``, ``trained_on``,
        ``eval_data``, ``train_images``, ``test_images``, ``seconds`` and ``file``.

    Raises:
        fedssd.errors.FedSSDError: A user-caused problem (arguments, run folder, data), in one
            sentence.
    """
    started = time.perf_counter()
    say: Log = log or (lambda _message: None)
    _check_arguments(protocol, labels, eval_data, eval_path, epochs)
    config, model = load_run(Path(run_dir))
    with cpu_threads(config.threads if threads is None else threads):
        return _evaluate(
            Path(run_dir),
            protocol,
            config,
            model,
            labels=labels,
            eval_data=eval_data,
            eval_path=eval_path,
            epochs=epochs,
            device=device,
            started=started,
            say=say,
        )


def _evaluate(
    run_dir: Path,
    protocol: str,
    config: Config,
    model: SSLModel,
    *,
    labels: float | None,
    eval_data: str | None,
    eval_path: str | None,
    epochs: int | None,
    device: str | None,
    started: float,
    say: Log,
) -> dict[str, Any]:
    """:func:`evaluate_run` once the run is loaded and the threads are set."""
    target = select_device(device or config.device)
    if eval_data is None:
        views = _own_views(config, say)
        trained_on = _in_channels(model)
        if views.train_images.shape[1] != trained_on:
            raise DataError(
                f"The run's data now has {views.train_images.shape[1]} channel(s) but its model "
                f"was trained on {trained_on}; restore the data the run was trained on."
            )
    else:
        views, _ = _transfer_views(config, eval_data, eval_path, say)
        _check_shape(config, model, views, eval_data, run_dir)
    model.to(target)
    note = label_warning(views.train_labels, views.test_labels)
    if note is not None:
        say(note)
    evaluation = config.evaluation
    seed = derive_seed(config.seed, EVALUATION)
    dataset_name = eval_data or config.data.name
    say(
        f"{protocol} evaluation of {run_dir} on {dataset_name}: "
        f"{views.train_images.shape[0]} training and {views.test_images.shape[0]} test images"
    )
    result: dict[str, Any] = {
        "protocol": protocol,
        "method": config.method.name,
        "trained_on": config.data.name,
        "eval_data": eval_data,
        "train_images": int(views.train_images.shape[0]),
        "test_images": int(views.test_images.shape[0]),
    }
    if protocol == "finetune":
        assert labels is not None  # checked by _check_arguments
        result.update(
            _finetune(config, model, views, labels=labels, epochs=epochs, device=target, log=say)
        )
    else:
        h_train, _ = extract_features(
            model, views.train_images, batch_size=evaluation.batch_size, device=target
        )
        h_test, _ = extract_features(
            model, views.test_images, batch_size=evaluation.batch_size, device=target
        )
        if protocol == "knn":
            result["knn_acc"] = knn_accuracy(
                h_train.to(target),
                views.train_labels,
                h_test,
                views.test_labels,
                num_classes=views.num_classes,
                k=evaluation.knn_k,
                temperature=evaluation.knn_temperature,
            )
        else:
            linear_epochs = epochs or _default_epochs(protocol, config)
            probe = linear_probe(
                h_train,
                views.train_labels,
                h_test,
                views.test_labels,
                num_classes=views.num_classes,
                epochs=linear_epochs,
                lr=evaluation.linear_lr,
                batch_size=evaluation.linear_batch_size,
                seed=seed,
                device=target,
                log=say,
            )
            quality = representation_metrics(
                h_train,
                views.train_clients,
                max_samples=evaluation.metrics_samples,
                max_per_client=evaluation.metrics_per_client,
                seed=seed,
            )
            result.update(
                linear_probe_acc=probe.accuracy,
                linear_probe_train_acc=probe.train_accuracy,
                linear_epochs=linear_epochs,
                uniformity_global=quality["uniformity_global"],
                effective_rank=quality["effective_rank"],
            )
    result["seconds"] = time.perf_counter() - started
    out_dir = Path(run_dir) / "eval"
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as error:
        raise DataError(
            f"Cannot create {out_dir} ({error.strerror}); check its permissions."
        ) from None
    default = _default_epochs(protocol, config)
    name = result_name(
        protocol,
        labels,
        eval_data,
        epochs=None if epochs in (None, default) else epochs,
        eval_path=eval_path,
    )
    path = out_dir / name
    result["file"] = name
    write_json(path, result)
    say(f"{protocol} result written to {path}")
    return result


def _finetune(
    config: Config,
    model: SSLModel,
    views: EvaluationViews,
    *,
    labels: float,
    epochs: int | None,
    device: torch.device,
    log: Log,
) -> dict[str, Any]:
    """Fine-tune on a stratified labelled fraction of the pool (seeds from the run seed)."""
    pool_labels = views.train_labels.numpy()
    chosen = stratified_fraction(
        pool_labels, labels, numpy_rng(config.seed, EVALUATION, _FINETUNE_SUBSET)
    )
    settings = FinetuneSettings(
        epochs=epochs or FinetuneSettings().epochs,
        eval_batch_size=config.evaluation.batch_size,
    )
    picked = torch.from_numpy(chosen)
    tests = (
        f"testing every {settings.eval_every} epochs and after the last"
        if settings.eval_every < settings.epochs
        else "testing after the last"
    )
    log(
        f"fine-tuning on {chosen.shape[0]} labelled images ({100 * labels:g}%) for "
        f"{settings.epochs} epochs, {tests}"
    )
    outcome = finetune(
        model.encoder,
        feature_dim=model.feature_dim,
        train_images=views.train_images[picked],
        train_labels=views.train_labels[picked],
        test_images=views.test_images,
        test_labels=views.test_labels,
        num_classes=views.num_classes,
        settings=settings,
        seed=derive_seed(config.seed, EVALUATION, _FINETUNE_TRAIN),
        device=device,
        autocast_dtype=autocast_dtype(config.precision, device),
        log=log,
    )
    return {
        "finetune_best_acc": outcome.best_accuracy,
        "finetune_last_acc": outcome.last_accuracy,
        "finetune_best_epoch": outcome.best_epoch,
        "finetune_evaluations": [list(item) for item in outcome.evaluations],
        "finetune_epochs": settings.epochs,
        "labels": labels,
        "labelled_images": int(chosen.shape[0]),
    }


def format_result(result: dict[str, Any]) -> str:
    """A one-row Markdown table of a result's headline numbers."""
    columns: list[tuple[str, str]] = [
        ("method", result["method"]),
        ("data", result["eval_data"] or result["trained_on"]),
    ]
    if result.get("labels") is not None:
        columns.append(("labels", f"{100 * result['labels']:g}% ({result['labelled_images']})"))
    percentages = (
        ("knn_acc", "kNN acc %"),
        ("linear_probe_acc", "LP acc %"),
        ("finetune_best_acc", "FT best %"),
        ("finetune_last_acc", "FT last %"),
    )
    for key, title in percentages:
        if key in result:
            columns.append((title, f"{100 * result[key]:.2f}"))
    for key, title, fmt in (
        ("uniformity_global", "-L_unif", "{:.3f}"),
        ("effective_rank", "eff. rank", "{:.1f}"),
    ):
        value = result.get(key)
        if key in result:
            columns.append(
                (title, "n/a" if value is None or not math.isfinite(value) else fmt.format(value))
            )
    columns.append(("seconds", f"{result['seconds']:.0f}"))
    header = "| " + " | ".join(title for title, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    row = "| " + " | ".join(value for _, value in columns) + " |"
    return "\n".join((header, rule, row))
