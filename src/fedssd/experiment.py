"""One experiment: built from a resolved config, its rounds run in a session.

:func:`build_experiment` assembles the parts (data, models, method, schedules) the simulator and
the Flower apps share; :func:`run_session` is the life of a run around its rounds (evaluation
views, round callbacks, checkpoints, trackers, the final evaluation and files), the same for the
simulator (:func:`simulate`) and the Flower ServerApp, which each bring their own round loop.
:mod:`fedssd.api` composes these into :func:`fedssd.train` and :func:`fedssd.resume`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedssd import config as config_module
from fedssd.config import Config
from fedssd.data.augment import AugmentConfig
from fedssd.data.datasets import DATASET_NAMES
from fedssd.data.federated import (
    EvaluationViews,
    FederatedData,
    prepare_data,
    run_evaluation_views,
)
from fedssd.data.partition import label_histogram
from fedssd.encoders import check_init_from
from fedssd.encoders import warm_start as copy_trained
from fedssd.errors import ConfigError
from fedssd.federation.callbacks import (
    checkpointer,
    client_progress,
    rewrite_round_logs,
    round_callbacks,
)
from fedssd.federation.client import LocalSettings
from fedssd.federation.evaluate import (
    client_evaluation,
    client_evaluation_seed,
    combine_client_evaluations,
    evaluate_model,
    label_warning,
)
from fedssd.federation.privacy import (
    check_noise_site,
    check_private_method,
    make_aggregator,
    privacy_summary,
    privacy_warning,
    release_view,
    split_summary,
)
from fedssd.federation.sampling import clients_per_round
from fedssd.federation.simulator import Callback, Guards, Schedule, run_rounds
from fedssd.methods import MethodContext, build_method
from fedssd.methods.protocol import ExtendsModel, Method
from fedssd.methods.server import server_state
from fedssd.models import SSLModel
from fedssd.openmp import wait_setting
from fedssd.runs.checkpoint import Checkpoint, remove_unreferenced_states, states_folder
from fedssd.runs.model import make_model, model_of
from fedssd.runs.outputs import SERVER_ONLY_SUMMARY, save_model, write_json, write_text_atomic
from fedssd.runs.sites import site_table
from fedssd.runs.store import ClientStore
from fedssd.runtime import (
    autocast_dtype,
    busy_machine_hint,
    cpu_threads,
    select_device,
    tune_malloc,
)
from fedssd.seeding import EVALUATION, EXTRAS_INIT, derive_seed
from fedssd.tracking import check_tracking, finish_trackers, make_trackers, tracker_callbacks

Log = Callable[[str], None]

Loop = Callable[[list[Callback], list[dict[str, Any]], ClientStore], list[dict[str, Any]]]
"""The rounds of a session: given the round callbacks, the history so far (one record per round
done, which the loop extends) and the client store, run the rounds still to do and return the
history. The simulator's loop is in :func:`simulate`; a Flower server's sends the rounds to its
nodes."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What a session returns (:func:`run_session`, and so :func:`fedssd.train`).

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


def build_experiment(config: Config, *, log: Log, data: FederatedData | None = None) -> Experiment:
    """Load the data and build the models, the method and the schedules of a resolved config.

    Args:
        config: The resolved config.
        log: Progress lines.
        data: The data, when the caller has it (a Flower node's own site, or no training data
            at all on a Flower server); else :func:`prepare_data` reads it.
    """
    device = select_device(config.device)
    if data is None:
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
            sampling=fed.sampling,
        ),
        settings=LocalSettings(
            epochs=fed.local_epochs,
            batch_size=fed.batch_size,
            lr=fed.lr,
            momentum=fed.momentum,
            weight_decay=fed.weight_decay,
            augment=augment,
            autocast_dtype=autocast_dtype(config.precision, device),
            drop_last=fed.drop_last,
        ),
        guards=Guards(
            faults=config.faults, validation=config.validation, privacy=make_aggregator(config)
        ),
        images=data.dataset.x_train.to(device),
        client_indices=[torch.from_numpy(p).long().to(device) for p in data.client_indices],
    )


def warm_start(experiment: Experiment, *, log: Log) -> None:
    """Start the global model from the trained encoder ``model.init_from`` names, if any.

    Only the server's (or simulator's) global model: clients receive its weights every round,
    so a Flower node never needs the source file.

    Raises:
        fedssd.errors.FedSSDError: The source is missing or does not fit the model.
    """
    if experiment.config.model.init_from is None:
        return
    copy_trained(experiment.global_model, experiment.config, log=log)


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


def check_setup(
    config: Config,
    *,
    sites_on_nodes: bool = False,
    history: Sequence[Mapping[str, Any]] = (),
    secure_aggregation: bool = False,
) -> None:
    """Build the model (without memory) and the method, so that a config they refuse fails
    before any data is read or file written.

    Args:
        config: The resolved config.
        sites_on_nodes: The run's sites are on Flower nodes (a ServerApp), so the config names
            none of them; otherwise ``data.partition = "clients"`` must say where they are.
        history: The records of the rounds already run (a resumed or extended run: a DP run's
            ledger must leave budget for its next round).
        secure_aggregation: The run aggregates with SecAgg+ (Flower), which distributed DP
            needs.
    """
    if config.data.name not in DATASET_NAMES:
        raise ConfigError(
            f"unknown dataset data.name = {config.data.name!r}; choose one of "
            f"{', '.join(DATASET_NAMES)}."
        )
    data = config.data
    if data.partition == "clients" and not sites_on_nodes and not data.clients and not data.path:
        raise ConfigError(
            "data.partition = 'clients' needs data.clients (one folder or .npz per client) or "
            "data.path (a folder with one subfolder per client)."
        )
    with torch.device("meta"):
        probe = model_of(config, in_channels=3)
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
        check_noise_site(config, secure_aggregation=secure_aggregation)
        # A target epsilon no noise can meet (with what the ledger has spent) fails here.
        aggregator = make_aggregator(config, history)
        assert aggregator is not None
        aggregator.check_budget(len(history))
    check_tracking(config)
    if config.model.init_from is not None:
        check_init_from(config, probe)


def run_session(
    experiment: Experiment,
    loop: Loop,
    *,
    out_dir: Path | None,
    resume_from: Checkpoint | None,
    started: float,
    say: Log,
    evaluate: Callable[[SSLModel], dict[str, Any]] | None = None,
    partition: Mapping[str, Any] | None = None,
) -> RunResult:
    """The life of a built experiment around its rounds, the same for the simulator and Flower:
    the evaluation views, the round callbacks (kNN monitor, ``metrics.jsonl``, progress,
    checkpoints, trackers), the rounds ``loop`` runs, then the final evaluation and files. The
    trackers are finished whatever happens (without a summary when the run fails).

    Args:
        experiment: The built experiment (its global model restored, for a resumed run).
        loop: Runs the rounds still to do.
        out_dir: The run folder, its header written; None writes nothing.
        resume_from: The checkpoint a resumed run continues from (its history and client
            store); None for a new run.
        started: ``time.perf_counter()`` when this process began the run (``train_seconds``
            also counts the earlier stretches a resumed run's checkpoint kept).
        say: Progress lines.
        evaluate: The final evaluation of a run without a labelled set on the server, done
            elsewhere (a Flower server asks its nodes); None evaluates here.
        partition: The run's ``partition.json`` content when the server does not hold the
            clients' data (None: :func:`partition_record` of the experiment's data).

    Returns:
        The result; the files are in ``out_dir``.
    """
    cfg, fed = experiment.config, experiment.config.federation
    if resume_from is not None:
        # The run's times count every stretch: the earlier ones as the checkpoint kept them.
        started -= resume_from.train_seconds
    views = run_evaluation_views(cfg, experiment.data, log=say)
    labels = None if views is None else label_warning(views.train_labels, views.test_labels)
    for note in (labels, privacy_warning(cfg)):
        if note is not None:
            say(note)
    store = resume_from.store if resume_from is not None else ClientStore()
    if out_dir is not None:
        # About one round's client states stay in memory; the others wait in the run folder.
        per_round = clients_per_round(num_clients=fed.num_clients, fraction=fed.fraction)
        store.spill(states_folder(out_dir), capacity=per_round)
    history = list(resume_from.history) if resume_from is not None else []
    if resume_from is not None and out_dir is not None:
        rewrite_round_logs(cfg, out_dir, history)  # the rounds after the checkpoint are redone
    callbacks = round_callbacks(cfg, views, experiment.device, out_dir, say)
    if out_dir is not None and cfg.checkpoint.every:
        callbacks.append(
            checkpointer(cfg, out_dir, experiment.method, store, history, started=started)
        )
    trackers = make_trackers(cfg, out_dir, say=say, resume=resume_from is not None)
    callbacks += tracker_callbacks(trackers, view=release_view(cfg))
    try:
        history = loop(callbacks, history, store)
        result = finish_run(
            experiment,
            history,
            views=views,
            out_dir=out_dir,
            started=started,
            say=say,
            evaluate=evaluate,
            partition=partition,
        )
    except BaseException:
        finish_trackers(trackers, None)
        raise
    finish_trackers(trackers, result.summary)
    if out_dir is not None:
        remove_unreferenced_states(out_dir)  # states spilled by a run without checkpoints
    return result


def simulate(
    experiment: Experiment,
    *,
    out_dir: Path | None,
    resume_from: Checkpoint | None,
    started: float,
    say: Log,
    verbose: bool,
) -> RunResult:
    """A session whose rounds the simulator runs in this process, with the config's CPU threads
    (see :func:`run_session`; ``verbose`` adds a line per client)."""
    cfg, data, fed = experiment.config, experiment.data, experiment.config.federation
    with cpu_threads(cfg.threads) as threads:
        tune_malloc()
        sizes = [len(p) for p in data.client_indices]
        say(
            f"{data.dataset.name}: {sum(sizes)} training images over {len(sizes)} clients "
            f"(smallest {min(sizes)}, largest {max(sizes)}), {len(data.test_indices)} test images"
        )
        say(
            f"training {cfg.method.name} on {experiment.device.type} ({threads} CPU threads, "
            f"{wait_setting(os.environ)}): "
            f"{fed.rounds} rounds, {fed.local_epochs} local epochs, {fed.num_clients} clients at "
            f"fraction {fed.fraction}"
        )
        hint = busy_machine_hint(threads)
        if hint is not None:
            say(hint)

        def rounds(
            callbacks: list[Callback], history: list[dict[str, Any]], store: ClientStore
        ) -> list[dict[str, Any]]:
            return run_rounds(
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
                on_client=client_progress(cfg.method.name, fed.rounds, say) if verbose else None,
            )

        return run_session(
            experiment, rounds, out_dir=out_dir, resume_from=resume_from, started=started, say=say
        )


def finish_run(
    experiment: Experiment,
    history: list[dict[str, Any]],
    *,
    views: EvaluationViews | None,
    out_dir: Path | None,
    started: float,
    say: Log,
    evaluate: Callable[[SSLModel], dict[str, Any]] | None = None,
    partition: Mapping[str, Any] | None = None,
) -> RunResult:
    """Evaluate the final global model and write ``model.safetensors``, the server state and
    ``summary.json``; ``views`` None means a federated evaluation on each client's own data
    (done by ``evaluate`` when given: a Flower server asks its nodes). ``partition`` is the
    run's ``partition.json`` content when the server does not hold the clients' data (None:
    :func:`partition_record` of the experiment's data); the summary's per-site table uses it."""
    cfg = experiment.config
    train_seconds = time.perf_counter() - started
    model = experiment.global_model
    if views is None and evaluate is not None:
        evaluation = evaluate(model)
    elif views is None:
        evaluation = federated_evaluation(
            cfg,
            experiment.data,
            model,
            augment=experiment.augment,
            device=experiment.device,
            log=say,
        )
    else:
        say("evaluating the final global model (kNN, linear probe, uniformity, alignment, rank)")
        evaluation = final_evaluation(
            cfg, views, model, augment=experiment.augment, device=experiment.device, log=say
        )
    summary = {
        "method": cfg.method.name,
        "dataset": experiment.data.dataset.name,
        **evaluation,
        "rounds": cfg.federation.rounds,
        "skipped_rounds": sum(1 for record in history if record.get("skipped")),
        "failed_clients": sum(len(record.get("failed", {})) for record in history),
        "rejected_clients": sum(len(record.get("rejected", {})) for record in history),
        "sites": site_table(
            partition if partition is not None else partition_record(cfg, experiment.data),
            history,
            evaluation,
        ),
        **privacy_summary(history, cfg.privacy),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        # Results are bit-identical only for the same thread count, so it is recorded.
        "threads": torch.get_num_threads(),
    }
    summary, server_only = split_summary(summary, cfg.privacy)
    if out_dir is not None:
        save_model(out_dir / "model.safetensors", model.state_dict())
        method_state = server_state(experiment.method)
        if method_state:
            save_model(out_dir / "server_state.safetensors", method_state)
        write_json(out_dir / "summary.json", summary)
        if server_only:
            write_json(out_dir / SERVER_ONLY_SUMMARY, server_only)
    return RunResult(config=cfg, history=history, summary=summary, out_dir=out_dir, model=model)


def write_header(out_dir: Path, config: Config, data: FederatedData) -> None:
    """The files written before training: the resolved config and the partition."""
    write_text_atomic(out_dir / "config.toml", config_module.dumps(config))
    write_json(out_dir / "partition.json", partition_record(config, data))


def partition_record(config: Config, data: FederatedData) -> dict[str, Any]:
    """The content of ``partition.json``: the scheme, the clients' sizes and label histogram.

    The histogram counts the labelled images only (labels are each site's own for
    ``partition = "clients"``); ``labelled`` gives each client's number of labelled images,
    ``image_shape`` the ``[channels, height, width]`` of the images and ``class_names`` the
    classes, when the data names them.
    """
    labels = data.dataset.y_train.numpy()
    parts = [p[labels[p] >= 0] for p in data.client_indices]
    # The unlabelled images (-1) are in no part; clipping them only satisfies the label check.
    histogram = (
        label_histogram(np.maximum(labels, 0), parts, num_classes=data.dataset.num_classes)
        if data.dataset.num_classes
        else np.zeros((len(parts), 0), dtype=np.int64)
    )
    record: dict[str, Any] = {
        "scheme": config.data.partition,
        "sizes": [len(p) for p in data.client_indices],
        "label_histogram": histogram.tolist(),
        "labelled": [len(p) for p in parts],
        # What the model takes (the export card and a later evaluation read it from here).
        "image_shape": [int(v) for v in data.dataset.x_train.shape[1:]],
    }
    if data.dataset.class_names:
        record["class_names"] = list(data.dataset.class_names)
    return record


def federated_evaluation(
    config: Config,
    data: FederatedData,
    model: SSLModel,
    *,
    augment: AugmentConfig,
    device: torch.device,
    log: Log,
) -> dict[str, Any]:
    """Every client evaluates ``model`` on its own images (as a Flower node does), combined.

    Client ``k`` uses the seed :func:`~fedssd.federation.evaluate.client_evaluation_seed`.
    """
    log(f"federated evaluation on each of the {len(data.client_indices)} clients' own images")
    per_client: dict[int, dict[str, float]] = {}
    for k, part in enumerate(data.client_indices):
        index = torch.from_numpy(part)
        labels = data.dataset.y_train[index]
        per_client[k] = client_evaluation(
            model,
            data.dataset.x_train[index],
            labels if bool((labels >= 0).any()) else None,
            settings=config.evaluation,
            augment=augment,
            seed=client_evaluation_seed(config.seed, k),
            device=device,
        )
    return combine_client_evaluations(per_client)


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
