"""Real sites on Flower: every node trains on its own images and nobody holds anyone else's.

Three sites of different kinds: site 0 a labelled ``.npz`` of Fashion-MNIST classes 0-3, site 1
a folder of PNG files of classes 4-6 without labels, site 2 an unlabelled ``.npz`` of classes
7-9; the server holds only a labelled evaluation set of test images.

(1) Flower's simulation engine (each virtual node reads ``data.clients[its id]``) ends with the
in-process simulator's weights.

(2) A deployment on 127.0.0.1 with TLS and SuperNode authentication, each SuperNode given its own
``data-path`` and ``state-dir``, the server no training data at all:
  a. 3 rounds: the run's files, the in-process simulator's weights, each node trained on exactly
     its own number of images, and no process opened a file of another party (a Python audit
     hook, installed through ``sitecustomize`` in every node's and the SuperLink's processes,
     logs every file opened under the data folder);
  b. a SuperNode killed during round 2: that client is recorded as failed in that round, the run
     goes on, and the restarted node rejoins a later round with its per-client state from its
     disk;
  c. the ServerApp killed after round 2 and the run resumed (``resume=true``): the same final
     weights as the uninterrupted in-process run.
Every process is started in its own session and stopped at the end; ports are free ports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from PIL import Image
from safetensors.torch import load_file

from fedssd.api import train
from fedssd.data.datasets import load_dataset
from fedssd.flower.node_state import load_client_state
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

EXPERIMENT = """\
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

# Logs every file a process opens under FEDSSD_TEST_WATCH to FEDSSD_TEST_OPEN_LOG.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os, sys
    _log = os.environ.get("FEDSSD_TEST_OPEN_LOG")
    _watch = os.environ.get("FEDSSD_TEST_WATCH")
    if _log and _watch:
        def _hook(event, args):
            if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
                return
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(_watch):
                fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(fd, (path + "\\n").encode())
                os.close(fd)
        sys.addaudithook(_hook)
    """
)


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
    config.write_text(EXPERIMENT.format(server=data / "server" / "eval.npz"))
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


def _in_process(world: dict[str, Path], out: Path, *extra: str) -> dict[str, torch.Tensor]:
    result = train(world["config"], overrides=[_sites(world), *extra], out=out, log=None)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def _assert_same_weights(expected: dict[str, torch.Tensor], path: Path) -> None:
    got = load_file(path)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


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
                                   connect_timeout=120.0, round_timeout=300.0)
            run_federation(grid, settings, log=print)

    run_simulation(
        server, client_app, num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}},
    )
    """
)


@pytest.mark.slow
def test_simulation_engine_on_sites_matches_in_process(
    world: dict[str, Path], tmp_path: Path
) -> None:
    # Without a server-side set (evaluation.data) the final evaluation is federated.
    runs = {
        "server-set": (world["config"], [_sites(world)]),
        "federated": (
            world["federated"],
            [_sites(world), "federation.rounds=2", 'tracking.backends="tensorboard"'],
        ),
    }
    in_process = {
        name: train(config, overrides=overrides, out=tmp_path / "in-process" / name, log=None)
        for name, (config, overrides) in runs.items()
    }
    flower = [
        [str(config), str(tmp_path / "flower" / name), overrides]
        for name, (config, overrides) in runs.items()
    ]
    done = subprocess.run(
        [sys.executable, "-c", _SIMULATION, json.dumps(flower)],
        env=flower_env(FLWR_HOME=str(tmp_path / "flwr-home")),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name, result in in_process.items():
        out = tmp_path / "flower" / name
        expected = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        _assert_same_weights(expected, out / "model.safetensors")
        lines = _lines(out / "metrics.jsonl")
        assert all(r["samples"] == {"0": 48, "1": 40, "2": 44} for r in lines)
    # The nodes evaluated the final model on their own images as the simulator's clients did.
    summary = json.loads((tmp_path / "flower" / "federated" / "summary.json").read_text())
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

    events = EventAccumulator(str(tmp_path / "flower" / "federated" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("round/loss")]
    history = _lines(tmp_path / "flower" / "federated" / "metrics.jsonl")
    assert losses == pytest.approx([r["loss"] for r in history], rel=1e-6)


def _openers(audit: Path) -> dict[str, set[str]]:
    """Which files under the data folder each party's processes opened."""
    return {
        log.stem: set(log.read_text().split())
        for log in sorted(audit.glob("*.log"))
        if log.stat().st_size
    }


def _node_statuses(env: dict[str, str]) -> list[str]:
    listed = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", "test", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if listed.returncode != 0:
        return []
    return [node["status"] for node in json.loads(listed.stdout)["nodes"]]


def _pids_running(name: str, marker: str) -> list[int]:
    """This test's processes whose command line mentions ``name``: those whose environment
    holds ``marker`` (read from /proc, so other programs on the machine are never touched)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if name in cmdline and marker.encode() in environ:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_sites_deployment_with_failures_and_resume(
    world: dict[str, Path], tmp_path: Path, processes: Processes
) -> None:
    write_tls(tmp_path)
    for k in range(3):
        write_node_key(tmp_path / f"node{k}")
    audit = tmp_path / "audit"
    audit.mkdir()
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    home, port = flwr_home(tmp_path)
    python_path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)

    def env(party: str) -> dict[str, str]:
        return flower_env(
            FLWR_HOME=str(home),
            PYTHONPATH=python_path,
            FEDSSD_TEST_WATCH=str(world["data"]),
            FEDSSD_TEST_OPEN_LOG=str(audit / f"{party}.log"),
        )

    ca = str(tmp_path / "ca.crt")
    start_superlink(
        processes,
        tmp_path,
        port,
        env("server"),
        register=["node0", "node1", "node2"],
        cli_env=env("cli"),
    )

    def supernode(k: int, name: str) -> subprocess.Popen[bytes]:
        site = world[f"site{k}"]
        state = tmp_path / f"state{k}"
        return processes.start(
            name,
            [
                str(BIN / "flower-supernode"),
                "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", ca,
                "--auth-supernode-private-key", str(tmp_path / f"node{k}"),
                "--node-config", f'client-id={k} data-path="{site}" state-dir="{state}"',
                "--port", str(free_port()),
            ],
            env(f"node{k}"),
        )  # fmt: skip

    nodes = {k: supernode(k, f"supernode{k}") for k in range(3)}

    def flwr_run(out: Path, extra: str, *, stream: bool) -> subprocess.CompletedProcess[str]:
        run_config = f'config="{world["config"]}" out="{out}" round-timeout=60.0 {extra}'
        return subprocess.run(
            [str(BIN / "flwr"), "run", str(FLOWER_APP), "test",
             *(["--stream"] if stream else []), "--run-config", run_config],
            env=env("cli"),
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip

    # (a) Three rounds: the simulator's weights, each node on its own images and files only.
    out = tmp_path / "run-a"
    done = flwr_run(out, "", stream=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _wait(lambda: (out / "summary.json").exists(), 60, "the first run's summary")
    lines = _lines(out / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert all(r["accepted"] == 3 and r["failed"] == {} for r in lines)
    assert all(r["samples"] == {"0": 48, "1": 40, "2": 44} for r in lines)
    partition = json.loads((out / "partition.json").read_text())
    assert partition["sizes"] == list(SIZES) and partition["labelled"] == [48, 0, 0]
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["knn_acc"] <= 1.0 and 0.0 <= summary["linear_probe_acc"] <= 1.0
    _assert_same_weights(_in_process(world, tmp_path / "in-process-a"), out / "model.safetensors")
    opened = _openers(audit)
    own = {f"node{k}": str(world["data"] / f"site{k}") for k in range(3)}
    own["server"] = str(world["data"] / "server")
    assert set(opened) == set(own), opened.keys()
    for party, files in opened.items():
        foreign = [f for f in files if not f.startswith(own[party] + os.sep)]
        assert not foreign, f"{party} opened {foreign}"

    # (b) A SuperNode killed while it trains in round 2; restarted, it rejoins a later round.
    out = tmp_path / "run-b"
    submitted = flwr_run(out, 'overrides="federation.rounds=5"', stream=False)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    _wait(
        lambda: processes.log("supernode1").count("Receiving: train message") >= 5,
        240,
        "node 1's round-2 task",
    )
    os.killpg(nodes[1].pid, signal.SIGKILL)
    nodes[1].wait(timeout=30)
    # The SuperLink lets the node's key in again once it has marked the dead session offline
    # (two missed heartbeats of 30 s at most); a node restarted earlier is refused.
    _wait(lambda: "offline" in _node_statuses(env("cli")), 150, "node 1 offline", poll=2.0)
    nodes[1] = supernode(1, "supernode1-restarted")
    _wait(lambda: (out / "summary.json").exists(), 400, "the second run's summary")
    lines = _lines(out / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["accepted"] == 3 and lines[1]["accepted"] == 2, lines
    assert list(lines[1]["failed"]) == ["1"], lines[1]
    assert all(set(r["failed"]) <= {"1"} for r in lines), lines
    trained = [i for i, r in enumerate(lines) if "1" not in r["failed"]]
    assert trained[0] == 0 and trained[-1] == 4, f"client 1 never rejoined: {lines}"
    run_key = json.loads((out / "flower.json").read_text())["run-key"]
    kept = load_client_state(tmp_path / "state1", run_key, 1, round_index=5)
    # FedEMA's per-client state survived the restart: every round it trained in counted.
    assert kept is not None and kept.last_round == 4 and kept.participations == len(trained)

    # (c) The ServerApp killed after round 2 of 4 and resumed: the uninterrupted weights.
    out = tmp_path / "run-c"
    submitted = flwr_run(out, 'overrides="federation.rounds=4"', stream=False)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    _wait(lambda: len(_lines(out / "metrics.jsonl")) >= 2, 240, "round 2 of the third run")
    marker = f"FEDSSD_TEST_WATCH={world['data']}"
    serverapps = _pids_running("flwr-serverapp", marker)
    assert serverapps, "no ServerApp process of this test is running"
    for pid in serverapps:
        os.kill(pid, signal.SIGKILL)
    assert not (out / "summary.json").exists()
    # The dead run's round-3 tasks may still run on the nodes while the resumed run redoes round 3:
    # both start from the same checkpointed model and state, so they write the same state.
    time.sleep(5)
    resumed = flwr_run(out, "resume=true", stream=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _wait(lambda: (out / "summary.json").exists(), 240, "the resumed run's summary")
    lines = _lines(out / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3, 4]
    assert all(r["accepted"] == 3 for r in lines), lines
    expected = _in_process(world, tmp_path / "in-process-c", "federation.rounds=4")
    _assert_same_weights(expected, out / "model.safetensors")
