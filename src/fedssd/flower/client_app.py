"""The Flower ClientApp: one client's local round, the same code path as the simulator's.

For each ``train`` message: load the global weights (and the method's server state) into the
client model, the method's ``begin_client`` hook with the state this client kept, the same
:func:`fedssd.federation.client.local_train` with the same per-(round, client id) generator,
``end_client``, and a reply carrying the model state without the method's local keys, the
method's payload and the training result. The kept state persists in the node's
``Context.state`` under the client's id.

A SuperNode's node config names its client: ``partition-id`` (0-based, as Flower's simulation
engine sets it). Optional ``data-root`` / ``data-path`` point the node at its own copy of the
dataset, and ``device`` picks its accelerator.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedssd import config as config_module
from fedssd.api import Experiment, build_experiment, resolve
from fedssd.config import Config
from fedssd.errors import ConfigError
from fedssd.federation.client import local_train
from fedssd.federation.simulator import local_keys
from fedssd.federation.store import stamp_participation
from fedssd.flower import records
from fedssd.flower.secagg import secure_aggregation_mod
from fedssd.methods.protocol import ClientHooks
from fedssd.methods.server import load_server_state
from fedssd.runtime import tune_malloc
from fedssd.seeding import CLIENT, generator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PARTITION_ID = "partition-id"

# SecAgg+ for the rounds of a run with secure-aggregation = true; other messages pass through.
app = ClientApp(mods=[secure_aggregation_mod])


def client_id_of(context: Context) -> int:
    """The client id this node plays (its ``partition-id`` node config).

    Raises:
        ConfigError: The node config has no integer ``partition-id``.
    """
    value = context.node_config.get(PARTITION_ID)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            "this SuperNode has no integer partition-id in its node config; start it with "
            "--node-config 'partition-id=K' (K = 0 .. num_clients - 1)."
        )
    return value


def node_config_for(text: str, context: Context) -> Config:
    """The experiment config sent by the server, with this node's own data location and device.

    Args:
        text: The resolved config as TOML text (``records.TASK["experiment"]``).
        context: The node's context; ``data-root``, ``data-path`` and ``device`` in its node
            config replace the server's values.
    """
    raw = tomllib.loads(text)
    overrides = []
    for key, field in (
        ("data-root", "data.root"),
        ("data-path", "data.path"),
        ("device", "device"),
    ):
        value = context.node_config.get(key)
        if isinstance(value, str) and value:
            overrides.append(f"{field}={json.dumps(value)}")
    return resolve(config_module.load(raw, overrides))


@functools.lru_cache(maxsize=2)
def _experiment(config_text: str) -> Experiment:
    """The node's experiment, built once per process and config (data loading is the slow part).

    A deployed SuperNode starts a fresh process per message, so there it is built every round;
    the simulation engine's workers keep it between rounds and clients.
    """
    config = resolve(config_module.load(tomllib.loads(config_text)))
    tune_malloc()
    return build_experiment(config, log=lambda _message: None)


def experiment_for(config: Config) -> Experiment:
    """The (cached) experiment of ``config``."""
    return _experiment(config_module.dumps(config))


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
    experiment = experiment_for(node_config_for(str(task["experiment"]), context))
    method, model = experiment.method, experiment.client_model
    load_server_state(method, records.from_arrays(message.content.array_records[records.METHOD]))
    # load_state_dict copies each CPU tensor onto the model's device itself.
    model.load_state_dict(records.from_arrays(message.content.array_records[records.GLOBAL]))
    hooks = method if isinstance(method, ClientHooks) else None
    stored = records.load_client_state(context.state, client_id)
    if hooks is not None:
        hooks.begin_client(model, stored, client_id=client_id, round_index=round_index)
    result = local_train(
        model,
        method,
        experiment.images,
        experiment.client_indices[client_id],
        settings=dataclasses.replace(experiment.settings, lr=lr),
        generator=generator(
            experiment.config.seed, CLIENT, round_index, client_id, device=experiment.images.device
        ),
        client_id=client_id,
        position=position,
        after_step=hooks.after_step if hooks is not None else None,
    )
    content = RecordDict({records.RESULT: records.result_to_metrics(result)})
    if not result.finite:
        # As in the simulator: a diverged client keeps nothing and sends no weights.
        return Message(content, reply_to=message)
    payload: dict[str, torch.Tensor] = {}
    if hooks is not None:
        kept, payload = hooks.end_client(
            model, stored, client_id=client_id, round_index=round_index
        )
        # save_client_state serializes the tensors to CPU bytes (records.to_arrays) itself.
        records.save_client_state(
            context.state, client_id, stamp_participation(kept, stored, round_index)
        )
    private = local_keys(model, method)
    content[records.STATE] = records.to_arrays(
        {k: v for k, v in model.state_dict().items() if k not in private}
    )
    content[records.PAYLOAD] = records.to_arrays(payload)
    return Message(content, reply_to=message)


def identify(message: Message, context: Context) -> Message:
    """Answer the server's roll call with this node's client id."""
    identity = MetricRecord({"client-id": client_id_of(context)})
    return Message(RecordDict({"identity": identity}), reply_to=message)


app.train()(train_client)
app.query()(identify)

__all__ = ["app", "client_id_of", "experiment_for", "identify", "node_config_for", "train_client"]
