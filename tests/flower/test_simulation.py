"""fedssd on Flower: the same weights as the in-process simulator, and a real TLS deployment.

(1) Equivalence: a tiny experiment (small CNN, 3 clients, 2 rounds, 300 Fashion-MNIST images) run
through :func:`fedssd.api.train` and through the Flower ServerApp / ClientApp on Flower's
simulation engine (Ray) ends with the same global weights, for a FedAvg method
(fedalignuniform), SSD (server state: scaling sets) and FedEMA (per-client state in the node's
Context.state, server lambdas sent back each round).

(2) Deployment: a SuperLink and 3 SuperNodes on 127.0.0.1 with TLS and SuperNode authentication,
``flwr run`` of the repository's Flower App for 2 rounds; the run's files are checked and its
weights compared with the in-process run; a SuperNode whose key was never registered is refused.
Every process is started in its own session and stopped in ``finally``; ports are free ports
picked at runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict
from safetensors.torch import load_file

from fedssd import config
from fedssd.api import train
from fedssd.errors import ConfigError
from fedssd.experiment import build_experiment
from fedssd.federation.client import LocalResult
from fedssd.flower import client_app, records
from fedssd.flower.client_app import client_id_of
from fedssd.methods.protocol import ClientState
from fedssd.runs.checkpoint import list_checkpoints, load_checkpoint
from fedssd.runs.resolve import load_config
from flower_testing import (
    BIN,
    FLOWER_APP,
    Processes,
    flower_env,
    flwr_home,
    free_port,
    start_superlink,
    write_node_key,
    write_tls,
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

# The Flower side of the equivalence test, run in its own process (Ray starts workers and
# changes the environment). One simulation runs the three experiments one after the other over
# the same 3 virtual SuperNodes (Ray starts once); FedEMA goes first because client state lives
# in each node's Context.state for the whole simulation.
_SIMULATION = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from fedssd.flower.client_app import app as client_app
    from fedssd.flower.server_app import RunSettings, run_federation

    config, out, *methods = sys.argv[1:]
    server = ServerApp()

    @server.main()
    def main(grid, context):
        for name in methods:
            settings = RunSettings(
                config=Path(config), overrides=(f"method.name={name}",),
                out=Path(out) / name, connect_timeout=120.0, round_timeout=300.0,
            )
            run_federation(grid, settings, log=print)

    run_simulation(
        server, client_app, num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}},
    )
    """
)


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


@pytest.fixture(scope="module")
def simulated(experiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three experiments through the Flower App on Flower's simulation engine."""
    out = tmp_path_factory.mktemp("simulated")
    done = subprocess.run(
        [sys.executable, "-c", _SIMULATION, str(experiment), str(out), *METHODS],
        env=flower_env(FLWR_HOME=str(out / "flwr-home")),
        capture_output=True,
        text=True,
        timeout=240,
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


# --- deployment --------------------------------------------------------------------------------


@pytest.mark.slow
def test_deployment_with_tls_and_supernode_authentication(
    tmp_path: Path,
    experiment: Path,
    in_process: dict[str, dict[str, torch.Tensor]],
    processes: Processes,
) -> None:
    write_tls(tmp_path)
    for name in ("node0", "node1", "node2", "rogue"):
        write_node_key(tmp_path / name)
    home, port = flwr_home(tmp_path)
    env = flower_env(FLWR_HOME=str(home))
    ca = str(tmp_path / "ca.crt")
    start_superlink(processes, tmp_path, port, env, register=["node0", "node1", "node2"])

    def supernode(name: str, key: str, partition: int, *extra: str) -> subprocess.Popen[bytes]:
        return processes.start(
            name,
            [
                str(BIN / "flower-supernode"),
                "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", ca,
                "--auth-supernode-private-key", str(tmp_path / key),
                "--node-config", f"partition-id={partition} num-partitions=3",
                "--port", str(free_port()),
                *extra,
            ],
            env,
        )  # fmt: skip

    for k in range(3):
        supernode(f"supernode{k}", f"node{k}", k)
    rogue = supernode("rogue", "rogue", 0, "--max-retries", "1", "--max-wait-time", "20")

    out = tmp_path / "run"
    run_config = f'config="{experiment}" out="{out}" overrides="method.name=ssd"'
    done = subprocess.run(
        [str(BIN / "flwr"), "run", str(FLOWER_APP), "test", "--stream",
         "--run-config", run_config],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    deadline = time.monotonic() + 60
    while not (out / "summary.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (out / "summary.json").exists(), done.stdout[-3000:] + processes.log("superlink")

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(r["accepted"] == 3 and r["failed"] == {} for r in lines)
    assert "knn_acc" in json.loads((out / "summary.json").read_text())
    assert (out / "config.toml").exists() and (out / "partition.json").exists()
    _assert_same_weights(in_process["ssd"], out / "model.safetensors")

    # The SuperNode whose key was never registered gave up without being let in.
    assert rogue.wait(timeout=60) != 0, processes.log("rogue")
    listed = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "test", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert len(json.loads(listed.stdout)["nodes"]) == 3
