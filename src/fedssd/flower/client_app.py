"""The Flower ClientApp: one client's local round, the same code path as the simulator's.

For each ``train`` message: load the global weights (and the method's server state) into the
client model, the method's ``begin_client`` hook with the state this client kept, local training
with the same per-(round, client id) generator and ``end_client`` (the simulator's own
:func:`fedssd.federation.round.client_round`), and a reply carrying the model state without the
method's local keys, the method's payload and the training result. The kept state persists on
the node's disk under its ``state-dir`` (:mod:`fedssd.flower.node_state`), else in the node's
``Context.state``, under the client's id. An ``evaluate`` message asks for the final model's
metrics on this node's own images (a federated evaluation); a ``query`` asks which client the
node plays.

A SuperNode's node config names its client: ``client-id`` (0-based; ``partition-id``, as
Flower's simulation engine sets it, when absent). In a run on the sites' own data
(``data.partition = "clients"``) ``data-path`` is this site's images, and the node reads nothing
else; in other runs ``data-root`` / ``data-path`` point the node at its own copy of the shared
dataset. ``device`` picks its accelerator. The run's ``threads`` setting applies on every node
as in the simulator.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedssd import config as config_module
from fedssd.config import Config
from fedssd.data.federated import node_data
from fedssd.errors import ConfigError
from fedssd.experiment import Experiment, build_experiment
from fedssd.federation.evaluate import client_evaluation, client_evaluation_seed
from fedssd.federation.round import client_round
from fedssd.flower import node_state, records
from fedssd.flower.records import SITES
from fedssd.flower.secagg import secure_aggregation_mod
from fedssd.methods.server import load_server_state
from fedssd.runs.resolve import resolve
from fedssd.runtime import cpu_threads, tune_malloc

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PARTITION_ID = "partition-id"
CLIENT_ID = "client-id"
STATE_DIR = "state-dir"

# SecAgg+ for the rounds of a run with secure-aggregation = true; other messages pass through.
app = ClientApp(mods=[secure_aggregation_mod])


def client_id_of(context: Context) -> int:
    """The client id this node plays: its ``client-id`` node config, else its ``partition-id``
    (the name Flower's simulation engine uses).

    Raises:
        ConfigError: The node config has neither as an integer.
    """
    value = context.node_config.get(CLIENT_ID, context.node_config.get(PARTITION_ID))
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            "this SuperNode has no integer client-id (or partition-id) in its node config; "
            "start it with --node-config 'client-id=K' (K = 0 .. num_clients - 1)."
        )
    return value


def _state_dir(context: Context) -> Path | None:
    """The node's ``state-dir``: where its client state is kept on disk (None: in memory)."""
    value = context.node_config.get(STATE_DIR)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError("the node config's state-dir must be a folder path in quotes.")
    return Path(value).expanduser()


# The node config keys that replace the server's values on this node, and the config fields
# they set.
NODE_SETTINGS = (("data-root", "data.root"), ("data-path", "data.path"), ("device", "device"))


def node_settings(context: Context) -> tuple[tuple[str, str], ...]:
    """This node's own ``data-root``, ``data-path`` and ``device``: the ones its node config
    sets, as ``(key, value)`` pairs."""
    settings = []
    for key, _field in NODE_SETTINGS:
        value = context.node_config.get(key)
        if isinstance(value, str) and value:
            settings.append((key, value))
    return tuple(settings)


def node_config_for(text: str, settings: Sequence[tuple[str, str]]) -> Config:
    """The experiment config sent by the server, with this node's own data location and device.

    Args:
        text: The resolved config as TOML text (``records.TASK["experiment"]``), parsed here.
        settings: The node's own settings (:func:`node_settings`); they replace the server's
            values, except ``data-path`` in a run on the sites' own data (see :func:`node_site`).
    """
    raw = tomllib.loads(text)
    sites = raw.get("data", {}).get("partition") == SITES
    fields = dict(NODE_SETTINGS)
    overrides = [
        f"{fields[key]}={json.dumps(value)}"
        for key, value in settings
        if not (key == "data-path" and sites)
    ]
    return resolve(config_module.load(raw, overrides))


def node_site(config: Config, settings: Sequence[tuple[str, str]], client_id: int) -> str | None:
    """This node's own data in a run on the sites' own data (``data.partition = "clients"``):
    its ``data-path`` node config, else the config's ``data.clients[client_id]`` (Flower's
    simulation engine, where every virtual node runs beside the data). None in other runs, where
    the node derives its part of a shared dataset from the run seed.

    Raises:
        ConfigError: A run on the sites' own data, and this node names no data.
    """
    if config.data.partition != SITES:
        return None
    value = dict(settings).get("data-path")
    if value:
        return str(Path(value).expanduser().resolve())
    if client_id < len(config.data.clients):
        return config.data.clients[client_id]
    raise ConfigError(
        f"this SuperNode (client {client_id}) has no data: the run trains on each site's own "
        "images, so start it with --node-config 'data-path=\"/path/to/its/images\"'."
    )


@functools.lru_cache(maxsize=2)
def _experiment(text: str, settings: tuple[tuple[str, str], ...], client_id: int) -> Experiment:
    """The node's experiment, built once per process, config and node settings (data loading
    is the slow part; the config text is parsed once, here).

    With a site (:func:`node_site`), the node reads that data alone and holds it as client
    ``client_id``'s part. A deployed SuperNode starts a fresh process per message, so there it
    is built every round (which the decoded-data cache of :mod:`fedssd.data.folder` keeps
    short); the simulation engine's workers keep it between rounds and clients.
    """
    config = node_config_for(text, settings)
    site = node_site(config, settings, client_id)
    tune_malloc()
    if site is None:
        return build_experiment(config, log=_quiet)
    own = node_data(config, client_id, site, log=_quiet)
    return build_experiment(config, log=_quiet, data=own)


def _quiet(_message: str) -> None:
    """A node's set-up says nothing (the server logs the run)."""


def experiment_for(text: str, context: Context, client_id: int) -> Experiment:
    """The (cached) experiment on this node of the config ``text`` the server sent."""
    return _experiment(text, node_settings(context), client_id)


def train_client(message: Message, context: Context) -> Message:
    """Run one client's local round for a ``train`` message (see the module docstring)."""
    task = message.content.config_records[records.TASK]
    client_id = client_id_of(context)
    expected_id = int(task["client-id"])  # type: ignore[arg-type]
    if expected_id != client_id:
        raise ConfigError(
            f"the server sent client {expected_id}'s task to the node playing client "
            f"{client_id}; restart the run so that the server maps the nodes again."
        )
    round_index = int(task["round"])  # type: ignore[arg-type]
    position = int(task["position"])  # type: ignore[arg-type]
    lr = float(task["lr"])  # type: ignore[arg-type]
    experiment = experiment_for(str(task["experiment"]), context, client_id)
    method, model = experiment.method, experiment.client_model
    load_server_state(method, records.from_arrays(message.content.array_records[records.METHOD]))
    state_dir = _state_dir(context)
    run_key = str(task.get("run-key", ""))
    if state_dir is not None and run_key:
        stored = node_state.load_client_state(
            state_dir, run_key, client_id, round_index=round_index
        )
    else:
        stored = records.load_client_state(context.state, client_id, run_key=run_key)
    # The run's threads, as the simulator trains with them (results depend on the count).
    with cpu_threads(experiment.config.threads):
        reply = client_round(
            model,
            method,
            experiment.images,
            experiment.client_indices[client_id],
            # load_state_dict copies each CPU tensor onto the model's device itself.
            global_state=records.from_arrays(message.content.array_records[records.GLOBAL]),
            stored=stored,
            settings=dataclasses.replace(experiment.settings, lr=lr),
            seed=experiment.config.seed,
            round_index=round_index,
            client_id=client_id,
            position=position,
        )
    content = RecordDict({records.RESULT: records.result_to_metrics(reply.result)})
    if reply.state is None:
        # As in the simulator: a diverged client keeps nothing and sends no weights.
        return Message(content, reply_to=message)
    if reply.kept is not None:
        if state_dir is not None and run_key:
            checkpoints = experiment.config.checkpoint
            node_state.save_client_state(
                state_dir,
                run_key,
                client_id,
                reply.kept,
                round_index=round_index,
                horizon=checkpoints.every * checkpoints.keep,
            )
        else:
            # save_client_state serializes the tensors to CPU bytes (records.to_arrays) itself.
            records.save_client_state(context.state, client_id, reply.kept, run_key=run_key)
    content[records.STATE] = records.to_arrays(reply.state)
    content[records.PAYLOAD] = records.to_arrays(reply.payload)
    return Message(content, reply_to=message)


def identify(message: Message, context: Context) -> Message:
    """Answer the server's roll call with this node's client id, and, in a run on the sites' own
    data (the server sends the experiment), the number and shape of this site's images."""
    client_id = client_id_of(context)
    identity = MetricRecord({"client-id": client_id})
    task = message.content.config_records.get(records.TASK)
    if task is not None and "experiment" in task:
        experiment = experiment_for(str(task["experiment"]), context, client_id)
        images = experiment.images
        labels = experiment.data.dataset.y_train
        identity["num-images"] = int(images.shape[0])
        identity["num-labelled"] = int((labels >= 0).sum())
        channels, height, width = (int(v) for v in images.shape[1:])
        identity["channels"], identity["height"], identity["width"] = channels, height, width
    return Message(RecordDict({"identity": identity}), reply_to=message)


def evaluate_client(message: Message, context: Context) -> Message:
    """A federated evaluation: the global model's metrics on this site's own images only
    (:func:`fedssd.federation.evaluate.client_evaluation`); the images never leave the node."""
    task = message.content.config_records[records.TASK]
    client_id = client_id_of(context)
    experiment = experiment_for(str(task["experiment"]), context, client_id)
    config = experiment.config
    model = experiment.client_model
    model.load_state_dict(records.from_arrays(message.content.array_records[records.GLOBAL]))
    labels = experiment.data.dataset.y_train
    labelled = bool((labels >= 0).any())
    with cpu_threads(config.threads):
        metrics = client_evaluation(
            model,
            experiment.images.cpu(),
            labels if labelled else None,
            settings=config.evaluation,
            augment=experiment.augment,
            seed=client_evaluation_seed(config.seed, client_id),
            device=experiment.device,
        )
    record = MetricRecord({"client-id": client_id, **{k: float(v) for k, v in metrics.items()}})
    return Message(RecordDict({records.RESULT: record}), reply_to=message)


app.train()(train_client)
app.query()(identify)
app.evaluate()(evaluate_client)

__all__ = [
    "app",
    "client_id_of",
    "evaluate_client",
    "experiment_for",
    "identify",
    "node_config_for",
    "node_settings",
    "node_site",
    "train_client",
]
