"""The Flower ServerApp: a fedssd experiment over Flower nodes, with the simulator's outputs.

The run config (``[tool.flwr.app.config]`` of the Flower App, or ``flwr run --run-config``)
names the same TOML file the CLI takes, plus overrides::

    config = "fedssd.toml"                      # relative to the App folder, or absolute
    overrides = "federation.rounds=5 method.name=ssd"
    out = "/abs/path/run"                       # "" = runs/flower-<run id> under the cwd
    overwrite = false
    resume = false                              # continue the run in `out` from its checkpoint
    round-timeout = 3600.0                      # seconds to wait for a round's replies
    connect-timeout = 300.0                     # seconds to wait for every client's node
    secure-aggregation = false                  # SecAgg+ (fedssd.flower.secagg, docs/privacy.md)
    secagg-clipping-range = 8.0                 # SecAgg+'s quantisation range [-c, c]
    secagg-client-metrics = false               # SecAgg+ clients also send loss and batches

The server builds the experiment like :func:`fedssd.api.train` (data, model, method, schedule),
finds which node plays which client id and runs the session of :func:`fedssd.experiment.run_session`
(the simulator's round callbacks: kNN monitor, ``metrics.jsonl``, checkpoints, progress,
trackers; the same final evaluation and files) with :class:`FlowerRounds` as its round loop: a
:class:`~fedssd.flower.strategy.MethodStrategy` over the nodes. So ``fedssd report`` reads a
Flower run like any other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import nn

from fedssd import config as config_module
from fedssd.config import Config
from fedssd.data.datasets import ImageDataset
from fedssd.data.federated import FederatedData
from fedssd.errors import ConfigError, DataError, FedSSDError
from fedssd.experiment import (
    Experiment,
    RunResult,
    build_experiment,
    check_setup,
    run_session,
    warm_start,
    write_header,
)
from fedssd.federation.evaluate import combine_client_evaluations
from fedssd.federation.server import Callback
from fedssd.flower import records, secagg
from fedssd.flower.records import SITES
from fedssd.flower.strategy import ClientsFailed, Identify, MethodStrategy
from fedssd.runs.outputs import (
    FLOWER_FILE,
    check_run_dir,
    prepare_run_dir,
    write_json,
    write_text_atomic,
)
from fedssd.runs.resolve import load_config
from fedssd.runs.resume import restore_checkpoint, resume_point
from fedssd.runs.store import ClientStore
from fedssd.runtime import cpu_threads

Log = Callable[[str], None]

app = ServerApp()
_LOGGER = logging.getLogger("flwr")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The Flower run config of a fedssd run.

    Attributes:
        config: Path of the experiment TOML.
        overrides: ``dotted.key=value`` overrides applied on top.
        out: Output folder.
        overwrite: Replace an earlier run's files in ``out``.
        resume: Continue the unfinished run in ``out`` from its newest checkpoint.
        round_timeout: Seconds to wait for a round's replies.
        connect_timeout: Seconds to wait until every client id has a node.
        secure_aggregation: Aggregate with SecAgg+ (:mod:`fedssd.flower.secagg`).
        secagg_clipping_range: SecAgg+'s quantisation range ``c``.
    """

    config: Path
    overrides: tuple[str, ...] = ()
    out: Path = Path("runs/flower")
    overwrite: bool = False
    resume: bool = False
    round_timeout: float = 3600.0
    connect_timeout: float = 300.0
    secure_aggregation: bool = False
    secagg_clipping_range: float = secagg.CLIPPING_RANGE

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, object], *, app_dir: Path | None, run_id: int
    ) -> RunSettings:
        """Read the run config (see the module docstring).

        Args:
            run_config: Flower's run config.
            app_dir: The installed Flower App folder, where a relative ``config`` is looked for
                first (then the working folder).
            run_id: Names the default output folder.

        Raises:
            ConfigError: A key is missing or of the wrong type.
        """

        def get(key: str, kind: type, default: object) -> object:
            value = run_config.get(key, default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind):
                raise ConfigError(
                    f"run config {key!r} must be a {kind.__name__}, got {value!r}; fix it in "
                    "[tool.flwr.app.config] or --run-config."
                )
            return value

        config = Path(str(get("config", str, "")))
        resume = bool(get("resume", bool, False))
        if (not str(config) or str(config) == ".") and not resume:
            raise ConfigError(
                "the run config has no 'config' (the experiment TOML); set it in "
                "[tool.flwr.app.config] or with --run-config 'config=\"path.toml\"'."
            )
        if not config.is_absolute() and app_dir is not None and (app_dir / config).is_file():
            config = app_dir / config
        out = str(get("out", str, ""))
        if resume and not out:
            raise ConfigError(
                'resume needs the run\'s folder: set out="/abs/path/run" in --run-config.'
            )
        return cls(
            config=config.resolve(),
            overrides=tuple(shlex.split(str(get("overrides", str, "")))),
            out=Path(out) if out else Path("runs") / f"flower-{run_id}",
            overwrite=bool(get("overwrite", bool, False)),
            resume=resume,
            round_timeout=float(get("round-timeout", float, 3600.0)),  # type: ignore[arg-type]
            connect_timeout=float(get("connect-timeout", float, 300.0)),  # type: ignore[arg-type]
            secure_aggregation=bool(get("secure-aggregation", bool, False)),
            secagg_clipping_range=float(
                get("secagg-clipping-range", float, secagg.CLIPPING_RANGE)  # type: ignore[arg-type]
            ),
        )


def ask_identities(
    grid: Grid,
    nodes: Sequence[int],
    *,
    timeout: float,
    log: Log,
    experiment_text: str | None = None,
    errors: dict[int, str] | None = None,
) -> dict[int, dict[str, int]]:
    """Ask ``nodes`` which client each plays (its ``identify`` reply: ``client-id`` and, when
    ``experiment_text`` is sent in a run on the sites' own data, the number of its images, of
    its labelled images, and their shape ``channels`` / ``height`` / ``width``).

    Args:
        grid: Flower's grid.
        nodes: The node ids to ask.
        timeout: Seconds to wait for the answers.
        log: Progress lines.
        experiment_text: The resolved config as TOML text, for a run on the sites' own data.
        errors: Receives node id -> the error a node answered with.

    Returns:
        Node id -> its identity, for the nodes that answered within ``timeout`` seconds.
    """
    if not nodes:
        return {}
    content = RecordDict()
    if experiment_text is not None:
        content[records.TASK] = ConfigRecord({"experiment": experiment_text})
    queries = [Message(content, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    answers: dict[int, dict[str, int]] = {}
    for reply in grid.send_and_receive(queries, timeout=max(1.0, timeout)):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(f"node {node} did not say which client it plays: {reply.error.reason}")
            if errors is not None:
                errors[node] = str(reply.error.reason)
            continue
        identity = reply.content.metric_records["identity"]
        answers[node] = {key: int(value) for key, value in identity.items()}  # type: ignore[arg-type]
    return answers


def discover_clients(
    grid: Grid,
    *,
    num_clients: int,
    timeout: float,
    log: Log,
    poll: float = 0.5,
    experiment_text: str | None = None,
) -> dict[int, dict[str, int]]:
    """Map each client id to the node playing it: ask every node for its ``partition-id``.

    Flower's node ids are random; client ids (and so sampling, seeds and DSR sets) come from the
    nodes' configs, so a run reproduces whatever ids the nodes get.

    Args:
        grid: Flower's grid.
        num_clients: Client ids 0 .. num_clients - 1 must all be present.
        timeout: Seconds to wait for nodes to connect and answer.
        log: Progress lines.
        poll: Seconds between looks at the connected nodes.
        experiment_text: Sent in a run on the sites' own data (see :func:`ask_identities`).

    Returns:
        Client id -> the identity of its node (``node-id``, ``client-id``, and the sizes of its
        data when it holds its own).

    Raises:
        ConfigError: Two nodes claim one id, a node's id is out of range, or not every client
            has a node within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    clients: dict[int, dict[str, int]] = {}
    asked: set[int] = set()
    errors: dict[int, str] = {}
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        asked.update(new)
        answers = ask_identities(
            grid,
            new,
            timeout=deadline - time.monotonic(),
            log=log,
            experiment_text=experiment_text,
            errors=errors,
        )
        for node, identity in answers.items():
            client_id = identity["client-id"]
            if not 0 <= client_id < num_clients:
                raise ConfigError(
                    f"node {node} has partition-id {client_id}, but the experiment has "
                    f"{num_clients} clients (ids 0..{num_clients - 1}); fix its node config."
                )
            if client_id in clients:
                raise ConfigError(
                    f"nodes {clients[client_id]['node-id']} and {node} both have partition-id "
                    f"{client_id}; give every SuperNode its own id."
                )
            clients[client_id] = {"node-id": node, **identity}
        missing = [k for k in range(num_clients) if k not in clients]
        if not missing:
            _say_who_plays(grid, clients, log)
            return clients
        if time.monotonic() > deadline:
            said = "".join(f" (node {n} answered: {r})" for n, r in sorted(errors.items())[:1])
            raise ConfigError(
                f"no node plays client(s) {missing} after {timeout:.0f}s{said}; start a "
                "SuperNode with --node-config 'client-id=K' for each of them."
            )
        time.sleep(poll)


def _say_who_plays(grid: Grid, clients: Mapping[int, Mapping[str, int]], log: Log) -> None:
    """One line per client: its node id, the name its key was registered under (``flwr
    supernode register --name``) and, in a run on the sites' own data, what it holds."""
    names = {node.node_id: node.name for node in grid.get_nodes()}
    for client_id, identity in sorted(clients.items()):
        node = identity["node-id"]
        name = f" ({names[node]})" if names.get(node) else ""
        held = (
            f": {identity['num-images']} images, {identity['num-labelled']} labelled"
            if "num-images" in identity
            else ""
        )
        log(f"client {client_id} is node {node}{name}{held}")


def _rejoin_identify(log: Log, timeout: float) -> Identify:
    """The strategy's question to nodes that joined during the run: which client do you play?"""

    def identify(grid: Grid, nodes: Sequence[int]) -> dict[int, int]:
        answers = ask_identities(grid, nodes, timeout=timeout, log=log)
        return {node: identity["client-id"] for node, identity in answers.items()}

    return identify


def _run_key(out_dir: Path, *, fresh: bool) -> str:
    """The run's key on the nodes (``flower.json`` in the run folder): new for a new run, the
    saved one for a resumed run."""
    path = out_dir / FLOWER_FILE
    if not fresh and path.is_file():
        try:
            key = json.loads(path.read_text(encoding="utf-8"))["run-key"]
            if isinstance(key, str):
                return key
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise DataError(f'{path} is damaged; it must hold the run\'s key as {{"run-key": ...}}.')
    key = uuid.uuid4().hex
    write_json(path, {"run-key": key})
    return key


def run_federation(
    grid: Grid, settings: RunSettings, *, log: Log
) -> tuple[RunResult, MethodStrategy]:
    """Build the experiment, run its rounds over the grid and write the run's files.

    With ``settings.resume``, the run in ``settings.out`` continues from its newest checkpoint
    (its own ``config.toml`` is used; ``config`` and ``overrides`` are ignored).

    Returns:
        The result (as :func:`fedssd.api.train` returns it) and the strategy (history, nodes).
    """
    started = time.perf_counter()
    point = None
    if settings.resume and settings.secure_aggregation:
        raise ConfigError(
            "resume does not work with secure-aggregation yet (the SecAgg+ workflow always "
            "starts at round 1); start the run again with overwrite=true."
        )
    if settings.resume:
        point = resume_point(settings.out, say=log)
        cfg = point.config
    else:
        cfg = load_config(settings.config, overrides=settings.overrides)
        check_run_dir(settings.out, overwrite=settings.overwrite)
    check_setup(
        cfg,
        sites_on_nodes=True,
        history=point.checkpoint.history if point else (),
        secure_aggregation=settings.secure_aggregation,
    )
    # What every client receives: the resolved config (it holds no secret: a DP run's secret
    # generator lives in this process alone).
    text = config_module.dumps(cfg)
    sites = cfg.data.partition == SITES
    if sites:
        # The nodes hold the data: the server reads none of it, only what each node says.
        clients = discover_clients(
            grid,
            num_clients=cfg.federation.num_clients,
            timeout=settings.connect_timeout,
            log=log,
            experiment_text=text,
        )
        experiment = build_experiment(cfg, log=log, data=no_training_data(cfg, clients))
    else:
        experiment = build_experiment(cfg, log=log)
        clients = discover_clients(
            grid, num_clients=cfg.federation.num_clients, timeout=settings.connect_timeout, log=log
        )
    if settings.secure_aggregation:
        secagg.check_secure_aggregation(cfg, experiment.method)
    saved = None
    if point is None:
        # model.init_from: the server's global model alone (the nodes receive its weights).
        warm_start(experiment, log=log)
        out_dir = prepare_run_dir(settings.out, overwrite=settings.overwrite)
        if sites:
            write_sites_header(out_dir, cfg, clients)
        else:
            write_header(out_dir, cfg, experiment.data)
    else:
        out_dir = settings.out
        saved = restore_checkpoint(
            point, model=experiment.global_model, method=experiment.method, out_dir=out_dir, say=log
        )
    rounds = FlowerRounds(
        grid,
        settings,
        experiment,
        clients,
        experiment_text=text,
        run_key=_run_key(out_dir, fresh=point is None),
        log=log,
    )
    # The server's share of the work (aggregation, monitor, final evaluation) and the summary's
    # thread count follow the run's threads setting, as on the nodes.
    with cpu_threads(cfg.threads):
        result = run_session(
            experiment,
            rounds,
            out_dir=out_dir,
            resume_from=saved,
            started=started,
            say=log,
            evaluate=rounds.evaluate_on_nodes if sites else None,
            partition=sites_partition(clients) if sites else None,
        )
    assert rounds.strategy is not None  # the session ran its rounds
    return result, rounds.strategy


@dataclasses.dataclass
class FlowerRounds:
    """The rounds of a Flower run (a :data:`fedssd.experiment.Loop`): a
    :class:`~fedssd.flower.strategy.MethodStrategy` that sends them to the nodes, plain or with
    SecAgg+, and the final federated evaluation on the nodes.

    Attributes:
        grid: Flower's grid.
        settings: The run config.
        experiment: The built experiment.
        clients: Client id -> its node's identity (:func:`discover_clients`).
        experiment_text: The resolved config as TOML text, sent to the nodes.
        run_key: The run's key on the nodes.
        log: Progress lines.
        strategy: The strategy, once the rounds have started.
    """

    grid: Grid
    settings: RunSettings
    experiment: Experiment
    clients: Mapping[int, Mapping[str, int]]
    experiment_text: str
    run_key: str
    log: Log
    strategy: MethodStrategy | None = None

    def __call__(
        self, callbacks: list[Callback], history: list[dict[str, Any]], _store: ClientStore
    ) -> list[dict[str, Any]]:
        """Run the rounds still to do; client states live on the nodes (Context.state, or
        their state-dir), so the server's client store stays empty."""
        experiment, settings, clients = self.experiment, self.settings, self.clients
        cfg = experiment.config
        strategy = self.strategy = MethodStrategy(
            global_model=experiment.global_model,
            method=experiment.method,
            schedule=experiment.schedule,
            guards=experiment.guards,
            nodes={client_id: identity["node-id"] for client_id, identity in clients.items()},
            experiment_text=self.experiment_text,
            callbacks=callbacks,
            history=history,
            run_key=self.run_key,
            identify=_rejoin_identify(self.log, timeout=min(30.0, settings.connect_timeout)),
            log=self.log,
        )
        remaining = cfg.federation.rounds - len(history)
        self.log(
            f"training {cfg.method.name} on Flower: {remaining} of {cfg.federation.rounds} "
            f"rounds, {cfg.federation.num_clients} clients at fraction {cfg.federation.fraction}"
        )
        if settings.secure_aggregation:
            sizes = (
                [clients[k]["num-images"] for k in sorted(clients)]
                if cfg.data.partition == SITES
                else [len(p) for p in experiment.data.client_indices]
            )
            secagg.run_secure(
                self.grid,
                strategy,
                max_weight=secagg.max_batches(cfg, sizes),
                clipping_range=settings.secagg_clipping_range,
                timeout=settings.round_timeout,
                log=self.log,
            )
        elif remaining > 0:
            strategy.start(
                self.grid,
                records.to_arrays(experiment.global_model.state_dict()),
                num_rounds=remaining,
                timeout=settings.round_timeout,
                evaluate_fn=strategy.after_round,
            )
        return strategy.history

    def evaluate_on_nodes(self, model: nn.Module) -> dict[str, Any]:
        """The final federated evaluation (:func:`evaluate_on_nodes`) on the strategy's nodes."""
        assert self.strategy is not None  # called after the rounds
        return evaluate_on_nodes(
            self.grid,
            self.strategy.nodes,
            model,
            self.experiment_text,
            timeout=self.settings.round_timeout,
            log=self.log,
        )


def no_training_data(config: Config, clients: Mapping[int, Mapping[str, int]]) -> FederatedData:
    """The server's data in a run on the sites' own data: no images at all, only their shape
    (which every node reported) and the clients' ids.

    Raises:
        ConfigError: The nodes' images differ in shape.
    """
    shapes = {
        (identity["channels"], identity["height"], identity["width"])
        for identity in clients.values()
    }
    if len(shapes) != 1:
        seen = ", ".join(
            f"client {k}: {c}x{h}x{w}"
            for k, (c, h, w) in sorted(
                (k, (i["channels"], i["height"], i["width"])) for k, i in clients.items()
            )
        )
        raise ConfigError(
            f"the sites' images differ in shape ({seen}); give every site images of one "
            "size and colour mode (data.image_size, data.rgb, data.pad_to_32)."
        )
    channels, height, width = shapes.pop()
    empty = torch.zeros((0, channels, height, width), dtype=torch.uint8)
    no_labels = torch.zeros(0, dtype=torch.long)
    return FederatedData(
        dataset=ImageDataset(
            name=SITES,
            x_train=empty,
            y_train=no_labels,
            x_test=empty,
            y_test=no_labels,
            num_classes=0,
        ),
        client_indices=[np.zeros(0, dtype=np.int64) for _ in range(config.federation.num_clients)],
        test_indices=np.zeros(0, dtype=np.int64),
        scheme=SITES,
    )


def sites_partition(clients: Mapping[int, Mapping[str, int]]) -> dict[str, Any]:
    """``partition.json`` of a run on the sites' own data: each client's number of images and of
    labelled images and the images' shape, as its node reported them (no label histogram: the
    server does not learn the sites' label distributions)."""
    ids = sorted(clients)
    first = clients[ids[0]]  # every site's images have one shape (no_training_data checks it)
    return {
        "scheme": SITES,
        "sizes": [clients[k]["num-images"] for k in ids],
        "labelled": [clients[k]["num-labelled"] for k in ids],
        "label_histogram": [[] for _ in ids],
        "image_shape": [first["channels"], first["height"], first["width"]],
    }


def write_sites_header(
    out_dir: Path, config: Config, clients: Mapping[int, Mapping[str, int]]
) -> None:
    """``config.toml`` and ``partition.json`` (:func:`sites_partition`) of a run on the sites'
    own data."""
    write_text_atomic(out_dir / "config.toml", config_module.dumps(config))
    write_json(out_dir / "partition.json", sites_partition(clients))


def evaluate_on_nodes(
    grid: Grid,
    nodes: Mapping[int, int],
    model: nn.Module,
    experiment_text: str,
    *,
    timeout: float,
    log: Log,
) -> dict[str, Any]:
    """A federated evaluation: every client's node evaluates ``model`` on its own images
    (:func:`fedssd.flower.client_app.evaluate_client`); the results are combined as the
    simulator combines them. Clients that do not answer are listed in ``clients_missing``."""
    log(f"federated evaluation on each of the {len(nodes)} sites' own images")
    weights = records.to_arrays(model.state_dict())
    task = ConfigRecord({"experiment": experiment_text})
    messages = [
        Message(
            RecordDict({records.GLOBAL: weights, records.TASK: task}),
            dst_node_id=node,
            message_type=MessageType.EVALUATE,
        )
        for node in nodes.values()
    ]
    by_node = {node: client_id for client_id, node in nodes.items()}
    per_client: dict[int, dict[str, float]] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        client_id = by_node.get(reply.metadata.src_node_id)
        if client_id is None:
            continue
        if reply.has_error():
            log(f"client {client_id} could not evaluate: {reply.error.reason}")
            continue
        metrics = reply.content.metric_records[records.RESULT]
        per_client[client_id] = {
            key: float(value)  # type: ignore[arg-type]
            for key, value in metrics.items()
            if key != "client-id"
        }
    if not per_client:
        raise ClientsFailed("no client answered the final federated evaluation.")
    evaluation = combine_client_evaluations(per_client)
    evaluation["clients_missing"] = sorted(set(nodes) - set(per_client))
    return evaluation


def _app_dir(grid: Grid) -> Path | None:
    """The installed Flower App folder of this run (None when run without a FAB)."""
    from flwr.common.config import get_project_dir  # only needed here

    run = grid.run
    try:
        return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)
    except ValueError:
        return None


class _SentenceOnly(logging.Filter):
    """Drops the traceback of a :class:`FedSSDError` from Flower's log: Flower logs whatever
    the ServerApp raised with its traceback, and a user's mistake is said in one sentence."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FedSSDError):
            record.exc_info = None
            record.exc_text = None
        return True


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: read the run config and run the federation.

    A :class:`FedSSDError` is logged as its one sentence and raised again, so that Flower
    marks the run ``finished:failed`` with that sentence as its status details (``flwr ls``);
    ``flwr run`` itself exits 0 whatever the run's end.
    """
    if not any(isinstance(f, _SentenceOnly) for f in _LOGGER.filters):
        _LOGGER.addFilter(_SentenceOnly())
    try:
        settings = RunSettings.from_run_config(
            context.run_config, app_dir=_app_dir(grid), run_id=context.run_id
        )
        result, _ = run_federation(grid, settings, log=_LOGGER.info)
    except FedSSDError as error:
        _LOGGER.error("fedssd run %s failed: %s", context.run_id, error)
        raise
    _LOGGER.info("fedssd run written to %s", result.out_dir)
