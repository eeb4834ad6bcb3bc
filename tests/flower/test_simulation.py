"""fedssd on Flower's simulation engine: the same weights as the in-process simulator.

(1) A tiny experiment on one shared dataset (small CNN, 3 clients, 2 rounds, 300 Fashion-MNIST
images) run through :func:`fedssd.api.train` and through the Flower ServerApp / ClientApp on
Flower's simulation engine (Ray) ends with the same global weights, for a FedAvg method
(fedalignuniform), SSD (server state: scaling sets) and FedEMA (per-client state in the node's
Context.state, server lambdas sent back each round).

(2) Real sites: three sites of different kinds, site 0 a labelled ``.npz`` of Fashion-MNIST
classes 0-3, site 1 a folder of PNG files of classes 4-6 without labels, site 2 an unlabelled
``.npz`` of classes 7-9, each virtual node reading ``data.clients[its id]``; the server holds only
a labelled evaluation set (and, in a second run, none: the final evaluation is federated). The
same weights and per-site metrics as in process.

All five runs go through one simulation (Ray starts once). The App on real SuperNodes, with TLS
and SuperNode authentication: tests/flower/test_deployment.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict
from PIL import Image
from safetensors.torch import load_file

from fedssd import config
from fedssd.api import train
from fedssd.data.datasets import load_dataset
from fedssd.errors import ConfigError
from fedssd.experiment import build_experiment
from fedssd.federation.client import LocalResult
from fedssd.flower import client_app, records
from fedssd.flower.client_app import client_id_of
from fedssd.methods.protocol import ClientState
from fedssd.runs.checkpoint import list_checkpoints, load_checkpoint
from fedssd.runs.resolve import load_config
from flower_testing import (
    flower_env,
)

METHODS = ("fedema", "fedalignuniform", "ssd")  # a stateful method first: see _SIMULATION

EXPERIMENT = """\
seed = 5
device = "cpu"

[data]
name = "fashion_mnist"
partition = "dirichlet"
alpha = 0.5
train_subset = 300
test_subset = 100
min_client_size = 10
pad_to_32 = false
rgb = false

[model]
encoder = "small_cnn"
width = 4
projector_hidden = 32

[method]
name = "ssd"

[federation]
num_clients = 3
fraction = 1.0
rounds = 2
local_epochs = 1
batch_size = 32
lr = 0.05

[evaluation]
every = 1
knn_k = 10
linear_epochs = 1
metrics_samples = 100
metrics_per_client = 30
"""

# The Flower side of the equivalence tests, run in its own process (Ray starts workers and
# changes the environment). One simulation runs every experiment one after the other over the
# same 3 virtual SuperNodes (Ray starts once); each run has its own run key, so client state
# kept in a node's Context.state by one run is never seen by another.
# The run's timeouts are hang guards only: on a loaded machine Ray's virtual nodes have taken
# more than 120 s to answer the first query.
_SIMULATION = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from fedssd.flower.client_app import app as client_app
    from fedssd.flower.server_app import RunSettings, run_federation

    runs = json.loads(sys.argv[1])
    server = ServerApp()

    @server.main()
    def main(grid, context):
        for config, out, overrides in runs:
            settings = RunSettings(config=Path(config), overrides=tuple(overrides), out=Path(out),
                                   connect_timeout=900.0, round_timeout=900.0)
            run_federation(grid, settings, log=print)

    run_simulation(
        server, client_app, num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}},
    )
    """
)


SITES_EXPERIMENT = """\
seed = 11
device = "cpu"

[data]
name = "folder"
partition = "clients"
image_size = 32
pad_to_32 = true
rgb = false

[model]
encoder = "small_cnn"
width = 4
projector_hidden = 32

[method]
name = "fedema"

[federation]
num_clients = 3
fraction = 1.0
rounds = 3
local_epochs = 1
batch_size = 16
lr = 0.05

[evaluation]
data = "{server}"
every = 1
knn_k = 5
linear_epochs = 2
metrics_samples = 60
metrics_per_client = 20

[checkpoint]
every = 1
keep = 2
"""

SIZES = (48, 40, 44)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three sites' data, the server's evaluation set and the experiment config."""
    base = tmp_path_factory.mktemp("world")
    data = base / "data"
    for name in ("site0", "site1", "site2", "server"):
        (data / name).mkdir(parents=True)
    fashion = load_dataset("fashion_mnist", download=False, pad_to_32=False, rgb=False)
    x, y = fashion.x_train[:, 0].numpy(), fashion.y_train.numpy()

    def take(classes: list[int], count: int) -> np.ndarray:
        return np.flatnonzero(np.isin(y, classes))[:count]

    first = take([0, 1, 2, 3], SIZES[0])
    np.savez(data / "site0" / "train.npz", x_train=x[first], y_train=y[first])
    for i, index in enumerate(take([4, 5, 6], SIZES[1])):
        Image.fromarray(x[index]).save(data / "site1" / f"scan{i:03d}.png")
    np.savez(data / "site2" / "train.npz", x_train=x[take([7, 8, 9], SIZES[2])])
    np.savez(
        data / "server" / "eval.npz",
        x_train=fashion.x_test[:100, 0].numpy(),
        y_train=fashion.y_test[:100].numpy(),
    )
    config = base / "experiment.toml"
    config.write_text(SITES_EXPERIMENT.format(server=data / "server" / "eval.npz"))
    federated = base / "experiment-federated.toml"
    federated.write_text(
        "\n".join(line for line in config.read_text().splitlines() if "eval.npz" not in line)
    )
    return {
        "base": base,
        "data": data,
        "config": config,
        "federated": federated,
        "site0": data / "site0" / "train.npz",
        "site1": data / "site1",
        "site2": data / "site2" / "train.npz",
    }


def _sites(world: dict[str, Path]) -> str:
    return "data.clients=" + json.dumps([str(world[f"site{k}"]) for k in range(3)])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("experiment") / "tiny.toml"
    path.write_text(EXPERIMENT)
    return path


@pytest.fixture(scope="module")
def in_process(
    experiment: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, torch.Tensor]]:
    """Final global weights of the in-process simulator, per method."""
    out = tmp_path_factory.mktemp("in_process")
    return {
        name: {
            k: v.detach().clone()
            for k, v in train(
                experiment, overrides=[f"method.name={name}"], out=out / name, log=None
            )
            .model.state_dict()
            .items()
        }
        for name in METHODS
    }


def _sites(world: dict[str, Path]) -> str:
    return "data.clients=" + json.dumps([str(world[f"site{k}"]) for k in range(3)])


def _sites_runs(world: dict[str, Path]) -> dict[str, tuple[Path, list[str]]]:
    """The runs on the sites: with the server's evaluation set, and without one (federated)."""
    return {
        "server-set": (world["config"], [_sites(world)]),
        "federated": (
            world["federated"],
            [_sites(world), "federation.rounds=2", 'tracking.backends="tensorboard"'],
        ),
    }


@pytest.fixture(scope="module")
def simulated(
    experiment: Path, world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Every experiment of this module through the Flower App on Flower's simulation engine:
    ``METHOD/`` on the shared dataset, ``sites/NAME/`` on the sites."""
    out = tmp_path_factory.mktemp("simulated")
    runs = [[str(experiment), str(out / name), [f"method.name={name}"]] for name in METHODS]
    runs += [
        [str(config), str(out / "sites" / name), overrides]
        for name, (config, overrides) in _sites_runs(world).items()
    ]
    done = subprocess.run(
        [sys.executable, "-c", _SIMULATION, json.dumps(runs)],
        env=flower_env(FLWR_HOME=str(out / "flwr-home")),
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only: Ray and five runs on a busy 2-core machine
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _assert_same_weights(expected: dict[str, torch.Tensor], path: Path) -> None:
    got = load_file(path)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_simulation_matches_in_process_simulator(
    method: str,
    experiment: Path,
    in_process: dict[str, dict[str, torch.Tensor]],
    simulated: Path,
) -> None:
    run = simulated / method
    _assert_same_weights(in_process[method], run / "model.safetensors")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(r["accepted"] == 3 and r["failed"] == {} for r in lines)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and 0.0 <= summary["knn_acc"] <= 1.0
    # The checkpoint after the last round (checkpoint.every = 5 > rounds) was written.
    checkpoints = list_checkpoints(run)
    assert [p.name for p in checkpoints] == ["round-000002"]
    saved = load_checkpoint(checkpoints[-1])
    assert saved.rounds_done == 2 and [r["round"] for r in saved.history] == [1, 2]
    for key, value in in_process[method].items():
        torch.testing.assert_close(saved.model[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # Training moved the weights (two skipped rounds would also match the simulator).
    initial = build_experiment(
        load_config(experiment, overrides=[f"method.name={method}"]), log=lambda _m: None
    ).global_model.state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in in_process[method].items())


def test_records_round_trip_client_state_and_results() -> None:
    state = RecordDict()
    kept = ClientState(
        tensors={"target.w": torch.arange(6, dtype=torch.float32).reshape(2, 3)},
        scalars={"lambda": 0.25},
        last_round=3,
        participations=2,
    )
    records.save_client_state(state, 7, kept)
    assert records.load_client_state(state, 6) is None
    back = records.load_client_state(state, 7)
    assert back is not None
    assert torch.equal(back.tensors["target.w"], kept.tensors["target.w"])
    assert (back.scalars, back.last_round, back.participations) == ({"lambda": 0.25}, 3, 2)
    # A later run on the same nodes (another run key) does not see an earlier run's state.
    records.save_client_state(state, 7, kept, run_key="run-a")
    assert records.load_client_state(state, 7, run_key="run-b") is None
    assert records.load_client_state(state, 7, run_key="run-a") is not None
    result = LocalResult(4, 5, 120, -1.5, {"align": 0.5, "uniform": -2.0}, 1.25)
    assert records.metrics_to_result(records.result_to_metrics(result)) == result


def test_a_node_parses_the_servers_config_once_per_process(
    experiment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's config text is parsed when the node first builds its experiment; later
    messages with the same text reuse the experiment without parsing it again."""
    text = config.dumps(load_config(experiment))
    parsed: list[str] = []
    loads = client_app.tomllib.loads

    def counting(source: str) -> dict[str, Any]:
        if source == text:
            parsed.append(source)
        return loads(source)

    monkeypatch.setattr(client_app.tomllib, "loads", counting)
    client_app._experiment.cache_clear()
    context = Context(
        run_id=1, node_id=1, node_config={"client-id": 0}, state=RecordDict(), run_config={}
    )
    first = client_app.experiment_for(text, context, 0)
    assert client_app.experiment_for(text, context, 0) is first
    assert len(parsed) == 1
    client_app._experiment.cache_clear()


def test_client_id_comes_from_the_node_config() -> None:
    def context(node_config: dict[str, object]) -> Context:
        return Context(
            run_id=1, node_id=99, node_config=node_config, state=RecordDict(), run_config={}
        )

    assert client_id_of(context({"partition-id": 2, "num-partitions": 3})) == 2
    assert client_id_of(context({"client-id": 1, "partition-id": 2})) == 1
    with pytest.raises(ConfigError, match="client-id"):
        client_id_of(context({}))
    with pytest.raises(ConfigError, match="client-id"):
        client_id_of(context({"client-id": "one"}))


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_simulation_engine_on_sites_matches_in_process(
    world: dict[str, Path], simulated: Path, tmp_path: Path
) -> None:
    in_process = {
        name: train(config, overrides=overrides, out=tmp_path / "in-process" / name, log=None)
        for name, (config, overrides) in _sites_runs(world).items()
    }
    flower = simulated / "sites"
    for name, result in in_process.items():
        out = flower / name
        expected = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        _assert_same_weights(expected, out / "model.safetensors")
        lines = _lines(out / "metrics.jsonl")
        assert lines and all(r["samples"] == {"0": 48, "1": 40, "2": 44} for r in lines)
    # The nodes evaluated the final model on their own images as the simulator's clients did.
    summary = json.loads((flower / "federated" / "summary.json").read_text())
    simulated = in_process["federated"].summary
    assert summary["evaluation"] == simulated["evaluation"] == "federated"
    assert summary["clients_missing"] == []
    assert sorted(summary["federated"]["per_client"]) == ["0", "1", "2"]
    for client, values in simulated["federated"]["per_client"].items():
        got = summary["federated"]["per_client"][client]
        assert sorted(got) == sorted(values)
        for key, value in values.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (client, key)
    assert "knn_acc" in summary and summary["knn_queries"] > 0
    # The ServerApp reports to the run's trackers as fedssd train does.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(flower / "federated" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("round/loss")]
    history = _lines(flower / "federated" / "metrics.jsonl")
    assert losses == pytest.approx([r["loss"] for r in history], rel=1e-6)
