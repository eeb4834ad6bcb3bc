"""The one call that runs an experiment: :func:`train`.

It composes the parts (data, partition, model, method, simulator, evaluation) and writes the run's
files. The CLI is a thin layer over it.

Example:
    >>> import fedssd
    >>> result = fedssd.train("smoke", overrides=["federation.rounds=2"], out="runs/x")
    >>> result.summary["knn_acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedssd import config as config_module
from fedssd import presets
from fedssd.config import Config
from fedssd.data.augment import AugmentConfig
from fedssd.data.datasets import DATASET_NAMES
from fedssd.data.federated import (
    EvaluationViews,
    FederatedData,
    named_dataset,
    prepare_data,
    run_evaluation_views,
)
from fedssd.data.partition import label_histogram
from fedssd.errors import ConfigError, DataError
from fedssd.experiments.checkpoint import (
    Checkpoint,
    check_model_state,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    remove_unreferenced_states,
    run_identity,
    states_folder,
)
from fedssd.experiments.outputs import (
    check_run_dir,
    prepare_run_dir,
    save_model,
    write_json,
    write_text_atomic,
)
from fedssd.experiments.sites import site_table
from fedssd.federation.callbacks import (
    SERVER_ONLY_SUMMARY,
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
from fedssd.federation.store import ClientStore
from fedssd.methods import MethodContext, build_method, option_dict
from fedssd.methods.protocol import ExtendsModel, Method
from fedssd.methods.server import load_server_state, server_state
from fedssd.models import SSLModel, build_model
from fedssd.runtime import (
    autocast_dtype,
    busy_machine_hint,
    cpu_threads,
    select_device,
    tune_malloc,
)
from fedssd.seeding import EVALUATION, EXTRAS_INIT, MODEL_INIT, derive_seed

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
        split_file=_absolute(
            None if data.split_file is None else presets.split_path(data.split_file)
        ),
        clients=tuple(str(_absolute(site)) for site in data.clients),
    )
    evaluation = config.evaluation
    if evaluation.data is not None and not named_dataset(evaluation.data):
        evaluation = dataclasses.replace(evaluation, data=_absolute(evaluation.data))
    model = config.model
    if model.init_from is not None:
        model = dataclasses.replace(model, init_from=_absolute(model.init_from))
    return dataclasses.replace(
        config,
        data=data,
        evaluation=evaluation,
        model=model,
        method=dataclasses.replace(config.method, options=options),
    )


def _absolute(path: str | None) -> str | None:
    """A path made absolute, so that the saved config reruns from any folder."""
    return None if path is None else str(Path(path).expanduser().resolve())


def load_config(config: Config | str | Path, *, overrides: Sequence[str] = ()) -> Config:
    """A validated, resolved :class:`Config` from a dataclass or a TOML path, with overrides.

    Args:
        config: A :class:`~fedssd.config.Config`, the path of a TOML file, or a preset's name
            (``demo``, ``paper/cifar10-silo-ssd``; ``fedssd configs`` lists them).
        overrides: ``dotted.key=value`` strings applied on top (e.g. ``"federation.rounds=5"``).

    Raises:
        fedssd.errors.ConfigError: The file is missing or a key is unknown, mistyped or out of
            range, in one sentence.
    """
    source = (
        config_module.to_dict(config) if isinstance(config, Config) else presets.config_path(config)
    )
    return resolve(config_module.load(source, overrides))


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
        check_noise_site(config, secure_aggregation=secure_aggregation)
        # A target epsilon no noise can meet (with what the ledger has spent) fails here.
        aggregator = make_aggregator(config, history)
        assert aggregator is not None
        aggregator.check_budget(len(history))
    from fedssd.tracking import check_tracking

    check_tracking(config)
    if config.model.init_from is not None:
        from fedssd.encoders import check_init_from

        check_init_from(config, probe)


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
    from fedssd.encoders import warm_start as copy_trained

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
    cfg = load_config(config, overrides=overrides)
    if out is not None:
        check_run_dir(Path(out), overwrite=overwrite)
    check_setup(cfg)
    experiment = build_experiment(cfg, log=say)
    warm_start(experiment, log=say)
    # Everything the user can get wrong has been checked: only now is the output folder touched.
    out_dir = prepare_run_dir(Path(out), overwrite=overwrite) if out is not None else None
    if out_dir is not None:
        write_header(out_dir, cfg, experiment.data)
    return _run(
        experiment, out_dir=out_dir, resume_from=None, started=started, say=say, verbose=verbose
    )


def resume(
    run_dir: str | Path,
    *,
    rounds: int | None = None,
    threads: int | None = None,
    log: Log | None = stderr_log,
    verbose: bool = False,
) -> RunResult:
    """Continue an interrupted run from its newest checkpoint, or extend a run to more rounds.

    The run's own ``config.toml`` is used. On the CPU, a resumed run ends with the same global
    weights, bit for bit, and the same metrics as the run would have without the interruption
    (with the same thread count). With ``rounds``, the run (finished or not) continues to that
    many rounds in all and ends as a run of that many rounds from the start would; the outputs of
    a finished run's shorter version are moved to ``<run>/rounds-<R>/`` first.

    Args:
        run_dir: The run folder.
        rounds: The total number of rounds to continue to (None: the run's own).
        threads: CPU threads for this process (None: the run's ``threads`` setting).
        log: Receives progress lines; None for silence.
        verbose: Also log a line after each client's local training.

    Raises:
        fedssd.errors.FedSSDError: The folder is not a run with a checkpoint, the checkpoint is
            corrupted or belongs to another run, or ``rounds`` cannot be reached bit-identically.
    """
    started = time.perf_counter()
    say: Log = log or (lambda _message: None)
    out_dir = Path(run_dir)
    point = resume_point(out_dir, rounds=rounds, threads=threads, say=say)
    check_setup(point.config, history=point.checkpoint.history)
    experiment = build_experiment(point.config, log=say)
    saved = restore_checkpoint(experiment, point, out_dir=out_dir, say=say)
    return _run(
        experiment, out_dir=out_dir, resume_from=saved, started=started, say=say, verbose=verbose
    )


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a run continues from (see :func:`resume_point`).

    Attributes:
        config: The config to continue with (``rounds`` and ``threads`` applied).
        stored: The run's own ``config.toml``.
        checkpoint: The newest readable checkpoint.
        path: Its folder.
        finished: Whether the run had finished (it is being extended).
    """

    config: Config
    stored: Config
    checkpoint: Checkpoint
    path: Path
    finished: bool


def resume_point(
    out_dir: Path, *, say: Log, rounds: int | None = None, threads: int | None = None
) -> ResumePoint:
    """The saved config of a run and its newest readable checkpoint; nothing is changed yet.

    Args:
        out_dir: The run folder.
        say: Progress lines (a skipped damaged checkpoint is reported).
        rounds: Extend the run to this many rounds in all (None: the run's own).
        threads: CPU threads for this process (None: the run's setting).

    Raises:
        fedssd.errors.FedSSDError: The folder is not a run with a checkpoint, the checkpoint is
            corrupted or belongs to another run, or ``rounds`` cannot be reached bit-identically.
    """
    config_path = out_dir / "config.toml"
    if not config_path.is_file():
        raise ConfigError(f"{out_dir} is not a fedssd run folder (it has no config.toml).")
    finished = (out_dir / "summary.json").exists()
    stored = load_config(config_path)
    if rounds is None and finished:
        raise ConfigError(
            f"the run in {out_dir} has finished (summary.json exists); nothing to resume "
            f"(add --rounds N, more than {stored.federation.rounds}, to continue it)."
        )
    cfg = stored
    if rounds is not None and rounds != stored.federation.rounds:
        if rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, not {rounds}.")
        if stored.federation.lr_schedule != "constant":
            raise ConfigError(
                f"the run in {out_dir} uses the {stored.federation.lr_schedule!r} learning-rate "
                "schedule, which depends on the total number of rounds, so it cannot be extended "
                "to equal a longer run; train a new run with federation.rounds set instead."
            )
        cfg = dataclasses.replace(
            stored, federation=dataclasses.replace(stored.federation, rounds=rounds)
        )
    if threads is not None:
        cfg = dataclasses.replace(cfg, threads=threads)
        config_module.validate(cfg)
    remove_partial_checkpoints(out_dir)
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        raise ConfigError(
            f"{out_dir} has no checkpoint to resume from (the run stopped before its first one, "
            f"written every {cfg.checkpoint.every} rounds); start it again with --overwrite."
        )
    saved, path = _newest_readable(checkpoints, say)
    if not same_run(saved.identity, cfg):
        raise DataError(
            f"checkpoint {path} was written by a different configuration than "
            f"{config_path}; resume only the run that wrote it."
        )
    total = cfg.federation.rounds
    if saved.rounds_done > total or (finished and saved.rounds_done == total):
        raise ConfigError(
            f"the run in {out_dir} has done {saved.rounds_done} rounds; pass --rounds N with N "
            f"greater than {saved.rounds_done} to continue it."
        )
    return ResumePoint(cfg, stored, saved, path, finished)


def restore_checkpoint(
    experiment: Experiment, point: ResumePoint, *, out_dir: Path, say: Log
) -> Checkpoint:
    """Load a checkpoint's global model and server state into ``experiment``, then (only now
    that everything is checked) set a finished run's outputs aside, rewrite ``config.toml`` for
    an extension and cut ``metrics.jsonl`` back to the checkpoint's rounds (the rounds after it
    are redone).

    Returns:
        The checkpoint, its history as the run being continued records it.

    Raises:
        DataError: The checkpoint's model does not fit the experiment's.
    """
    cfg, stored, saved = point.config, point.stored, point.checkpoint
    check_model_state(experiment.global_model.state_dict(), saved.model, where=point.path)
    experiment.global_model.load_state_dict(saved.model)
    load_server_state(experiment.method, saved.server)
    if point.finished:
        _set_aside(out_dir, saved.rounds_done, say)
    total = cfg.federation.rounds
    if total != stored.federation.rounds:
        write_text_atomic(
            out_dir / "config.toml", config_module.dumps(_stored_threads(cfg, stored))
        )
        say(f"extending {out_dir} from {stored.federation.rounds} to {total} rounds")
    history = [_as_in_longer_run(record, cfg) for record in saved.history]
    saved = dataclasses.replace(saved, history=history)
    say(f"resuming {out_dir} after round {saved.rounds_done} of {total}")
    rewrite_round_logs(cfg, out_dir, saved.history)
    return saved


def same_run(identity: dict[str, Any], config: Config) -> bool:
    """Whether a checkpoint's run identity belongs to ``config``'s run.

    ``federation.rounds`` is left out under the constant learning-rate schedule, where the rounds
    done do not depend on the total, so that a run extended with ``--rounds`` still resumes from
    the checkpoints written before the extension.
    """
    expected = run_identity(config_module.to_dict(config))
    if config.federation.lr_schedule == "constant":
        expected = _without_rounds(expected)
        identity = _without_rounds(identity)
    return identity == expected


def _without_rounds(identity: dict[str, Any]) -> dict[str, Any]:
    federation = {k: v for k, v in dict(identity.get("federation", {})).items() if k != "rounds"}
    return {**identity, "federation": federation}


def _stored_threads(config: Config, stored: Config) -> Config:
    """``config`` with the run's own thread setting (``--threads`` applies to this process)."""
    return dataclasses.replace(config, threads=stored.threads)


def _as_in_longer_run(record: dict[str, Any], config: Config) -> dict[str, Any]:
    """A history record as a run of ``config``'s rounds has it: the kNN monitor also measures
    the last round of a shorter run, which a longer run skips unless it is an evaluation round."""
    done, every = int(record["round"]), config.evaluation.every
    if "knn_acc" in record and done != config.federation.rounds and (not every or done % every):
        return {k: v for k, v in record.items() if k != "knn_acc"}
    return record


def _set_aside(out_dir: Path, rounds_done: int, say: Log) -> None:
    """Move a finished run's final outputs to ``rounds-<R>/`` before it is extended."""
    target = out_dir / f"rounds-{rounds_done}"
    if target.exists():
        raise ConfigError(f"{target} already exists; move it away before extending the run.")
    names = (
        "summary.json",
        "model.safetensors",
        "server_state.safetensors",
        "eval",
        "columns.json",
        str(SERVER_ONLY_SUMMARY),
    )
    moved = [name for name in names if (out_dir / name).exists()]
    target.mkdir()
    for name in moved:
        (target / name).parent.mkdir(exist_ok=True)
        (out_dir / name).rename(target / name)
    say(f"the {rounds_done}-round run's {', '.join(moved)} moved to {target}")


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
    with cpu_threads(experiment.config.threads) as threads:
        return _run_with_threads(
            experiment,
            out_dir=out_dir,
            resume_from=resume_from,
            started=started,
            say=say,
            verbose=verbose,
            threads=threads,
        )


def _run_with_threads(
    experiment: Experiment,
    *,
    out_dir: Path | None,
    resume_from: Checkpoint | None,
    started: float,
    say: Log,
    verbose: bool,
    threads: int,
) -> RunResult:
    cfg, data = experiment.config, experiment.data
    if resume_from is not None:
        # The run's times count every stretch: the earlier ones as the checkpoint kept them.
        started -= resume_from.train_seconds
    tune_malloc()
    views = run_evaluation_views(cfg, data, log=say)
    sizes = [len(p) for p in data.client_indices]
    say(
        f"{data.dataset.name}: {sum(sizes)} training images over {len(sizes)} clients "
        f"(smallest {min(sizes)}, largest {max(sizes)}), {len(data.test_indices)} test images"
    )
    fed = cfg.federation
    say(
        f"training {cfg.method.name} on {experiment.device.type} ({threads} CPU threads): "
        f"{fed.rounds} rounds, {fed.local_epochs} local epochs, {fed.num_clients} clients at "
        f"fraction {fed.fraction}"
    )
    labels = None if views is None else label_warning(views.train_labels, views.test_labels)
    for note in (busy_machine_hint(threads), labels, privacy_warning(cfg)):
        if note is not None:
            say(note)
    store = resume_from.store if resume_from is not None else ClientStore()
    if out_dir is not None:
        # About one round's client states stay in memory; the others wait in the run folder.
        per_round = clients_per_round(num_clients=fed.num_clients, fraction=fed.fraction)
        store.spill(states_folder(out_dir), capacity=per_round)
    history = list(resume_from.history) if resume_from is not None else []
    callbacks = round_callbacks(cfg, views, experiment.device, out_dir, say)
    if out_dir is not None and cfg.checkpoint.every:
        callbacks.append(
            checkpointer(cfg, out_dir, experiment.method, store, history, started=started)
        )
    from fedssd.tracking import finish_trackers, make_trackers, tracker_callbacks

    trackers = make_trackers(cfg, out_dir, say=say, resume=resume_from is not None)
    callbacks += tracker_callbacks(trackers, view=release_view(cfg))
    try:
        result = _rounds_and_finish(
            experiment,
            callbacks,
            store,
            history,
            views=views,
            out_dir=out_dir,
            started=started,
            say=say,
            verbose=verbose,
        )
    except BaseException:
        finish_trackers(trackers, None)
        raise
    finish_trackers(trackers, result.summary)
    if out_dir is not None:
        remove_unreferenced_states(out_dir)  # states spilled by a run without checkpoints
    return result


def _rounds_and_finish(
    experiment: Experiment,
    callbacks: list[Callback],
    store: ClientStore,
    history: list[dict[str, Any]],
    *,
    views: EvaluationViews | None,
    out_dir: Path | None,
    started: float,
    say: Log,
    verbose: bool,
) -> RunResult:
    """The round loop and the final evaluation of :func:`_run`."""
    cfg, fed = experiment.config, experiment.config.federation
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
        on_client=client_progress(cfg.method.name, fed.rounds, say) if verbose else None,
    )
    return finish_run(experiment, history, views=views, out_dir=out_dir, started=started, say=say)


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
