"""docs/deployment.md's federation, and what goes wrong in one.

The module's deployment is the page's own: its commands run as they are written there
(:mod:`deployment_walkthrough`: the page's ports replaced by free ones, this venv instead of the
page's install) up to its "Stop": three sites of Fashion-MNIST PNG files, a SuperLink with TLS,
SuperNode authentication and ``--database``, three SuperNodes each with its own ``data-path``,
``state-dir`` and ``FLWR_HOME``, and the page's 3-round SSD run. A Python audit hook
(``sitecustomize``, in every process the page and the tests start) logs every file opened under
the page's folder. The tests then share that SuperLink and those SuperNodes:

1. the page's run: its files, the in-process simulator's weights, and no ServerApp or ClientApp
   opened a file of another machine;
2. a mistake in the run config: one sentence in the stream, and ``flwr ls`` says failed;
3. a site's machine dies as its node receives round 2's task of 3 (SIGKILL from inside, at
   that moment): the round names it as gone offline, and the SuperNode started again by the
   page's systemd unit rejoins round 3 with its FedEMA state from its disk;
4. the coordinator dies after round 1 of 2 (the SuperLink and the ServerApp, SIGKILL): the SuperLink
   started again by the page's systemd unit (its full path, the unit's PATH, ``--database``)
   keeps the SuperNodes, which come back without registering again, and the resumed run ends
   with the in-process simulator's weights;
5. SecAgg+ over two rounds, a site dropping out in the second: FedAvg of the three, then of the
   other two, to SecAgg+'s quantisation error;
6. distributed DP under SecAgg+, a site dropping out: the ledger counts the shares that
   arrived, nothing per-site is released, and the model carries the shares' noise;
7. a SuperNode whose key was never registered is refused;
8. last, a SuperLink started again without its database turns the SuperNodes away,
   and they exit with status 0, which is why the page's units say ``Restart=always``.

Nothing waits for time to pass: the hooks of :mod:`hooks_app` act at known rounds, and the
tests wait only for conditions (a process gone, a node offline, a file written), each with a
limit that only a hung test reaches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file

import deployment_walkthrough as walkthrough
from fedssd import api, config
from fedssd.aggregate import fedavg
from fedssd.experiment import build_experiment
from fedssd.federation.client import local_train
from fedssd.federation.simulator import round_lr
from fedssd.flower import secagg
from fedssd.flower.node_state import load_client_state
from fedssd.flower.strategy import OFFLINE
from fedssd.runs.checkpoint import list_checkpoints, load_checkpoint
from fedssd.seeding import CLIENT, generator
from flower_testing import Processes

HERE = Path(__file__).resolve().parent
SITES = ("a", "b", "c")
LIMIT = 600.0  # seconds before a wait gives up: only a hung deployment gets there

# Logs every file a process opens under FEDSSD_TEST_WATCH, with the process's command line.
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
            if path.startswith(_watch + os.sep):
                line = " ".join(sys.argv).replace("\\t", " ") + "\\t" + path + "\\n"
                fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                os.write(fd, line.encode())
                os.close(fd)
        sys.addaudithook(_hook)
    """
)

# A small experiment on the page's sites, for the tests' own runs.
EXPERIMENT = """\
seed = 23
device = "cpu"

[data]
name = "folder"
partition = "clients"
image_size = 32

[model]
encoder = "small_cnn"
width = 4
projector_hidden = 32

[method]
name = "{method}"

[federation]
num_clients = 3
rounds = {rounds}
local_epochs = 1
batch_size = 32
lr = 0.05

[evaluation]
data = "{folder}/coordinator/eval"
every = 0
linear_epochs = 1
metrics_samples = 100
metrics_per_client = 20

[checkpoint]
every = 1
keep = 2
"""


@dataclasses.dataclass
class Deployment:
    """The page's running federation, and what the tests started or stopped in it."""

    folder: Path
    env: dict[str, str]
    ports: dict[int, int]
    audit: Path
    processes: Processes
    superlink: int  # process id of the running SuperLink
    nodes: dict[str, int]  # site -> process id of its running SuperNode
    node_logs: dict[str, Path]  # site -> its running SuperNode's log
    rogue: subprocess.Popen[bytes] | None = None

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """A process of the tests' own (a unit's command), in the page's folder."""
        return self.processes.start(name, command, env, cwd=self.folder)

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["flwr", *args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=LIMIT,
        )
        if check:
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    def run_config(self, **values: object) -> str:
        def value(v: object) -> str:
            if isinstance(v, bool):
                return str(v).lower()
            return json.dumps(v) if isinstance(v, str) else str(v)

        return " ".join(f"{key.replace('_', '-')}={value(v)}" for key, v in values.items())

    def submit(self, app: Path, **values: object) -> int:
        """Start a run (no stream) and return its run id."""
        done = self.flwr("run", str(app), "hospitals", "--run-config", self.run_config(**values))
        return _run_id(done.stdout)

    def stream(self, app: Path, **values: object) -> subprocess.CompletedProcess[str]:
        """A run with ``--stream``, to its end."""
        return self.flwr(
            "run", str(app), "hospitals", "--stream", "--run-config", self.run_config(**values)
        )

    def status(self, run_id: int) -> tuple[str, str]:
        listed = self.flwr("ls", "hospitals", "--run-id", str(run_id), "--format", "json")
        (run,) = json.loads(listed.stdout)["runs"]
        return run["status"], run["status-details"]

    def node_statuses(self) -> list[str]:
        listed = self.flwr("supernode", "list", "hospitals", "--format", "json", check=False)
        if listed.returncode != 0:
            return []
        # While the SuperLink is down or starting, a JSON error without "nodes".
        return [node["status"] for node in json.loads(listed.stdout).get("nodes", [])]

    def unit(self, name: str) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of the page's systemd unit ``name``, for this
        deployment's folder, venv and ports."""
        return _unit(name, self.folder, self.ports)

    def experiment(self, name: str, method: str, rounds: int) -> Path:
        path = self.folder / "coordinator" / "tests" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(EXPERIMENT.format(method=method, rounds=rounds, folder=self.folder))
        return path

    def sites(self) -> str:
        """The in-process simulator's override naming the page's sites."""
        folders = [str(self.folder / f"site-{s}" / "images") for s in SITES]
        return "data.clients=" + json.dumps(folders)


def _tails(folder: Path) -> str:
    """The ends of the walk-through's log and of its SuperLink's and SuperNodes' logs."""
    logs = [folder / "walkthrough.log", folder / "coordinator" / "superlink.log"]
    logs += [folder / f"site-{site}" / "supernode.log" for site in SITES]
    return "\n".join(
        f"--- {log.relative_to(folder)}:\n{log.read_text(errors='replace')[-2500:]}"
        for log in logs
        if log.exists()
    )


def _run_id(output: str) -> int:
    for line in output.splitlines():
        if line.startswith("Successfully started run "):
            return int(line.split()[3])
    raise AssertionError(f"no run id in: {output[-2000:]}")


def _unit(name: str, folder: Path, ports: dict[int, int]) -> tuple[list[str], dict[str, str]]:
    page = walkthrough.PAGE.read_text(encoding="utf-8")
    (block,) = [
        b
        for b in walkthrough.blocks(page)
        if b.language == "ini" and b.text.startswith(f"# /etc/systemd/system/{name}.service")
    ]
    venv = str(Path(sys.executable).parent.parent)
    text = walkthrough.with_ports(block.text, ports)
    text = text.replace("/srv/fedssd/fedssd-env", venv).replace("/srv/fedssd", str(folder))
    env: dict[str, str] = {}
    command: list[str] = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            name_, _, setting = value.partition("=")
            env[name_] = setting
        elif key == "ExecStart":
            command = shlex.split(value)
        elif key == "WorkingDirectory":
            assert Path(value) == folder, value
    assert command and Path(command[0]).is_absolute(), text
    return command, env


def _marked(marker: str) -> list[int]:
    """The processes whose environment holds ``marker`` (this module's, whoever started them;
    read from /proc, so other programs on the machine are never touched)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(condition: Callable[[], bool], what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {LIMIT:.0f}s waiting for {what}")
        time.sleep(poll)


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _in_process(deployment: Deployment, config_path: Path, out: Path) -> dict[str, torch.Tensor]:
    result = api.train(config_path, overrides=[deployment.sites()], out=out, log=None)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def _assert_same_weights(expected: dict[str, torch.Tensor], path: Path) -> None:
    got = load_file(path)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _hooks_app(deployment: Deployment) -> Path:
    """The page's Flower App with :mod:`hooks_app` as its ServerApp and ClientApp."""
    app = deployment.folder / "coordinator" / "hooks_app"
    if not app.exists():
        shutil.copytree(deployment.folder / "coordinator" / "flower_app", app)
        text = (app / "pyproject.toml").read_text()
        for part in ("serverapp", "clientapp"):
            text = text.replace(f'{part} = "fedssd.flower.{part[:6]}_app:app"', "")
        text = text.replace(
            "[tool.flwr.app.components]",
            '[tool.flwr.app.components]\nserverapp = "hooks_app:server"\n'
            'clientapp = "hooks_app:client"',
        )
        keys = ("kill-client", "kill-round", "drop-client", "drop-round", "hold-round")
        keys += ("crash-round",)
        text += "".join(f"test-{key} = -1\n" for key in keys)
        text += 'test-hold-file = ""\ntest-crash-pidfile = ""\n'
        (app / "pyproject.toml").write_text(text)
        shutil.copy(HERE / "hooks_app.py", app / "hooks_app.py")
    return app


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("deployment")
    folder = base / "walkthrough"
    hooks = base / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit = base / "audit.log"
    page = walkthrough.PAGE.read_text(encoding="utf-8")
    ports = walkthrough.free_mapping(page)
    python_path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)
    hook_env = {
        "PYTHONPATH": python_path,
        "FEDSSD_TEST_WATCH": str(folder),
        "FEDSSD_TEST_OPEN_LOG": str(audit),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    env = walkthrough.environment(install=False, extra=hook_env)
    logs = base / "logs"
    logs.mkdir()
    processes = Processes(logs)
    run = walkthrough.start(folder, install=False, until="9. Stop", mapping=ports, env=env)
    with walkthrough.session(run):
        try:
            code = run.wait(timeout=2 * LIMIT)
            assert code == 0, f"the page's commands failed ({code}):\n{_tails(folder)}"
            deployment = Deployment(
                folder=folder,
                env={**env, "FLWR_HOME": str(folder / "coordinator" / "flwr-home")},
                ports=ports,
                audit=audit,
                processes=processes,
                superlink=int((folder / "coordinator" / "superlink.pid").read_text()),
                nodes={s: int((folder / f"site-{s}" / "supernode.pid").read_text()) for s in SITES},
                node_logs={s: folder / f"site-{s}" / "supernode.log" for s in SITES},
            )
            # (6) A SuperNode whose key was never registered tries once while the tests go on.
            key = folder / "rogue" / "supernode"
            key.parent.mkdir()
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)],
                check=True,
            )
            command, unit_env = deployment.unit("fedssd-supernode")
            command[command.index("--auth-supernode-private-key") + 1] = str(key)
            command[command.index("--node-config") + 1] = "client-id=0"
            command[command.index("--port") + 1] = str(walkthrough.free_ports(1)[0])
            command += ["--max-retries", "1", "--max-wait-time", "20"]
            unit_env["FLWR_HOME"] = str(key.parent / "flwr-home")
            deployment.rogue = deployment.start("rogue", command, unit_env)
            yield deployment
        finally:
            processes.close()
            # The ServerApps and ClientApps that Flower started in sessions of their own.
            for pid in _marked(f"FEDSSD_TEST_WATCH={folder}"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_the_pages_federation(deployment: Deployment, tmp_path: Path) -> None:
    folder = deployment.folder
    out = folder / "coordinator" / "runs" / "hospitals"
    lines = _lines(out / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert all(r["accepted"] == 3 and r["failed"] == {} for r in lines)
    assert all(r["samples"] == {"0": 300, "1": 300, "2": 300} for r in lines)
    partition = json.loads((out / "partition.json").read_text())
    assert partition["sizes"] == [300, 300, 300] and partition["labelled"] == [300, 0, 0]
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["knn_acc"] <= 1.0 and 0.0 <= summary["linear_probe_acc"] <= 1.0
    _assert_same_weights(
        _in_process(deployment, folder / "coordinator" / "hospitals.toml", tmp_path / "run"),
        out / "model.safetensors",
    )
    # The stream names each site by the name its key was registered under.
    log = (folder / "walkthrough.log").read_text(errors="replace")
    for client, site in enumerate(SITES):
        assert f"client {client} is node " in log and f"(site-{site}): 300 images" in log, log
    # Each ServerApp and ClientApp opened files of its own machine only.
    own = {"serverapp": folder / "coordinator"}
    by_port = {}
    for k, site in enumerate(SITES):
        own[f"site-{site}"] = folder / f"site-{site}"
        by_port[str(deployment.ports[39610 + k])] = f"site-{site}"
    opened: dict[str, set[str]] = {}
    for line in deployment.audit.read_text().splitlines():
        command, _, path = line.partition("\t")
        if "flwr-serverapp" in command:
            party = "serverapp"
        elif "flwr-clientapp" in command:
            party = by_port[command.split("--runtime-api-address")[1].split()[0].split(":")[1]]
        else:
            continue  # the page's own commands, the tests' flwr commands
        opened.setdefault(party, set()).add(path)
    assert set(opened) == set(own), opened.keys()
    for party, files in opened.items():
        foreign = sorted(f for f in files if not f.startswith(str(own[party]) + os.sep))
        assert not foreign, f"{party} opened {foreign[:5]}"


@pytest.mark.slow
def test_a_mistake_in_the_run_is_one_sentence(deployment: Deployment) -> None:
    not_a_run = deployment.folder / "coordinator" / "certs"
    app = deployment.folder / "coordinator" / "flower_app"
    done = deployment.stream(app, resume=True, out=str(not_a_run))
    # Flower's `flwr run` exits 0 however the run ended; the run's status says it failed.
    assert done.returncode == 0
    run_id = _run_id(done.stdout)
    sentence = f"{not_a_run} is not a fedssd run folder (it has no config.toml)."
    assert f"fedssd run {run_id} failed: {sentence}" in done.stdout, done.stdout[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stdout[-3000:]
    _wait(lambda: deployment.status(run_id)[0].startswith("finished"), "the run's status")
    status, details = deployment.status(run_id)
    assert status == "finished:failed" and sentence in details, (status, details)


@pytest.mark.slow
def test_a_site_that_dies_mid_round_is_named_and_rejoins(
    deployment: Deployment, tmp_path: Path
) -> None:
    folder = deployment.folder
    experiment = deployment.experiment("site-dies", "fedema", rounds=3)
    out = folder / "coordinator" / "runs" / "site-dies"
    hold = tmp_path / "site-a-is-back"
    streamed = subprocess.Popen(
        ["flwr", "run", str(_hooks_app(deployment)), "hospitals", "--stream", "--run-config",
         deployment.run_config(
             config=str(experiment), out=str(out), round_timeout=600.0,
             test_kill_client=0, test_kill_round=2, test_hold_round=2, test_hold_file=str(hold),
         )],
        cwd=folder, env=deployment.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        # Site A's machine goes down as its node receives round 2's task.
        _wait(lambda: not _alive(deployment.nodes["a"]), "site A's SuperNode to die")
        # Its key is let in again once the SuperLink has marked the dead session offline.
        _wait(lambda: "offline" in deployment.node_statuses(), "site A offline", poll=5.0)
        command, unit_env = deployment.unit("fedssd-supernode")
        restarted = deployment.start(
            "site-a-restarted", command, {**unit_env, **_hook_env(deployment)}
        )
        deployment.nodes["a"] = restarted.pid
        deployment.node_logs["a"] = deployment.processes.logs / "site-a-restarted.log"
        _wait(
            lambda: restarted.poll() is not None or deployment.node_statuses() == ["online"] * 3,
            "site A back online",
            poll=2.0,
        )
        assert restarted.poll() is None, deployment.processes.log("site-a-restarted")
        hold.touch()  # round 3 may start
        output, _ = streamed.communicate(timeout=LIMIT)
    finally:
        if streamed.poll() is None:
            streamed.kill()
            streamed.wait()
    lines = _lines(out / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3], output[-3000:]
    # Round 2 waited until the SuperLink gave up on the node, not for the 600 s round timeout.
    assert lines[1]["failed"] == {"0": OFFLINE} and lines[1]["accepted"] == 2, lines[1]
    assert all(r["failed"] == {} and r["accepted"] == 3 for i, r in enumerate(lines) if i != 1)
    assert lines[1]["seconds"] < 600
    assert "round 2/3: client 0 (node " in output and f") failed: {OFFLINE}" in output, output
    assert (out / "summary.json").exists(), output[-3000:]
    # FedEMA's state of client 0 survived on its disk: rounds 1 and 3 counted.
    run_key = json.loads((out / "flower.json").read_text())["run-key"]
    kept = load_client_state(folder / "site-a" / "state", run_key, 0, round_index=3)
    assert kept is not None and kept.last_round == 2 and kept.participations == 2


def _hook_env(deployment: Deployment) -> dict[str, str]:
    keys = ("PYTHONPATH", "FEDSSD_TEST_WATCH", "FEDSSD_TEST_OPEN_LOG", "OMP_NUM_THREADS")
    return {key: deployment.env[key] for key in keys}


@pytest.mark.slow
def test_the_coordinator_dies_and_the_run_resumes_exactly(
    deployment: Deployment, tmp_path: Path
) -> None:
    folder = deployment.folder
    experiment = deployment.experiment("coordinator-dies", "fedema", rounds=2)
    out = folder / "coordinator" / "runs" / "coordinator-dies"
    pidfile = tmp_path / "superlink.pid"
    pidfile.write_text(str(deployment.superlink))
    crashed = deployment.submit(
        _hooks_app(deployment), config=str(experiment), out=str(out),
        test_crash_round=1, test_crash_pidfile=str(pidfile),
    )  # fmt: skip
    _wait(lambda: not _alive(deployment.superlink), "the SuperLink to die")
    assert [r["round"] for r in _lines(out / "metrics.jsonl")] == [1]
    # The page's unit starts it again: by its full path, with the unit's PATH and --database.
    command, unit_env = deployment.unit("fedssd-superlink")
    superlink = deployment.start(
        "superlink-restarted", command, {**unit_env, **_hook_env(deployment)}
    )
    deployment.superlink = superlink.pid
    # The SuperNodes waited, and come back without being registered again.
    _wait(
        lambda: superlink.poll() is not None or deployment.node_statuses() == ["online"] * 3,
        "the SuperNodes back online",
        poll=2.0,
    )
    assert superlink.poll() is None, deployment.processes.log("superlink-restarted")
    assert all(_alive(pid) for pid in deployment.nodes.values())
    resumed = deployment.stream(
        folder / "coordinator" / "flower_app", resume=True, out=str(out)
    ).stdout
    assert "Flower's [ROUND 1] of this resumed run is round 2/2 of the fedssd run" in resumed
    assert (out / "summary.json").exists(), resumed[-3000:]
    assert [r["round"] for r in _lines(out / "metrics.jsonl")] == [1, 2]
    _assert_same_weights(
        _in_process(deployment, experiment, tmp_path / "in-process"), out / "model.safetensors"
    )
    # The run that died is not reported as finished well.
    status, _ = deployment.status(crashed)
    assert status != "finished:completed", status


def _fedavg_of(
    cfg: config.Config, clients: list[int], start: dict[str, torch.Tensor], round_index: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Round ``round_index`` of the in-process simulator from ``start``, restricted to
    ``clients``, and their weights (numbers of batches)."""
    experiment = build_experiment(cfg, log=lambda _m: None)
    settings = dataclasses.replace(
        experiment.settings, lr=round_lr(experiment.schedule, round_index)
    )
    states, weights = [], []
    for client_id in clients:
        model = experiment.client_model
        model.load_state_dict(start)
        result = local_train(
            model,
            experiment.method,
            experiment.images,
            experiment.client_indices[client_id],
            settings=settings,
            generator=generator(
                cfg.seed, CLIENT, round_index, client_id, device=experiment.images.device
            ),
            client_id=client_id,
            position=client_id,  # every client is sampled, in id order
        )
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        weights.append(result.num_batches)
    return fedavg(states, [float(w) for w in weights]), weights


def _assert_within(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], bound: float):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if value.is_floating_point():
            # float32 storage of the result adds a rounding of its own.
            limit = bound + 2 * float(value.abs().max()) * 2**-24
            error = float((got[key].double() - value.double()).abs().max())
            assert error <= limit, (key, error, limit)
        else:
            assert torch.equal(got[key], value), key


# The sites' photo updates leave SecAgg+'s default range [-8, 8]; the run config widens it.
CLIPPING_RANGE = 64.0


def _quantisation_bound(cfg: config.Config, sizes: list[int], weights: list[int]) -> float:
    """SecAgg+'s bound on one entry of the mean: each client's scaled entry is stochastically
    rounded to a step of 2c / Q, so the mean is off by at most n * (2c / Q) / sum(w / max_w)."""
    max_weight = secagg.max_batches(cfg, sizes)
    step = 2 * CLIPPING_RANGE / secagg.QUANTIZATION_RANGE
    return len(weights) * step / sum(w / max_weight for w in weights)


@pytest.mark.slow
def test_secure_aggregation_survives_a_site_dropping_out(deployment: Deployment) -> None:
    folder = deployment.folder
    experiment = deployment.experiment("secure", "fedalignuniform", rounds=2)
    sets = ["validation.max_norm_ratio=0"]
    out = folder / "coordinator" / "runs" / "secure"
    done = deployment.stream(
        _hooks_app(deployment), config=str(experiment), out=str(out), overrides=" ".join(sets),
        secure_aggregation=True, secagg_clipping_range=CLIPPING_RANGE, test_drop_client=2,
        test_drop_round=2,
    )  # fmt: skip
    assert (out / "summary.json").exists(), done.stdout[-3000:]
    first, second = _lines(out / "metrics.jsonl")
    assert first["secure_aggregation"] is True
    assert first["accepted"] == 3 and first["failed"] == {}
    assert second["accepted"] == 2
    assert second["failed"] == {"2": "dropped out of secure aggregation"}
    cfg = config.load(experiment, [*sets, deployment.sites()])
    sizes = [300, 300, 300]
    initial = build_experiment(cfg, log=lambda _m: None).global_model.state_dict()
    # Round 1: every site answered; the checkpoint after it holds FedAvg of the three.
    expected, weights = _fedavg_of(cfg, [0, 1, 2], initial, 0)
    bound = _quantisation_bound(cfg, sizes, weights)
    assert bound < 1e-4  # 3 clients, c = 64, Q = 2^22: a few 1e-5
    (checkpoint,) = [p for p in list_checkpoints(out) if p.name == "round-000001"]
    after_first = load_checkpoint(checkpoint).model
    _assert_within(expected, after_first, bound)
    # Round 2: site C dropped out after the key exchange; the others' shares unmask 0 + 1.
    expected, weights = _fedavg_of(cfg, [0, 1], after_first, 1)
    final = load_file(str(out / "model.safetensors"))
    _assert_within(expected, final, _quantisation_bound(cfg, sizes, weights))
    with_all, _ = _fedavg_of(cfg, [0, 1, 2], after_first, 1)
    assert not math.isclose(
        float(final["projector.0.weight"].sum()), float(with_all["projector.0.weight"].sum())
    )


@pytest.mark.slow
def test_distributed_dp_under_secagg_noises_every_share_on_the_sites(
    deployment: Deployment,
) -> None:
    """Distributed DP over the deployment: each site clips its update and adds its secret share
    of the noise before masking; a site drops out, the round is accounted with the shares that
    arrived, and nothing per-site leaves in the clear."""
    folder = deployment.folder
    experiment = deployment.experiment("distributed-dp", "fedalignuniform", rounds=1)
    clip, z_min, cohort, shares_in = 1.0, 1.0, 3, 2
    sets = [
        "validation.max_norm_ratio=0", "evaluation.every=0", "privacy.dp=fixed",
        "privacy.mode=distributed", f"privacy.clip_norm={clip}",
        f"privacy.noise_multiplier={z_min}", "privacy.min_replies=0.5",
    ]  # fmt: skip
    out = folder / "coordinator" / "runs" / "distributed-dp"
    done = deployment.stream(
        _hooks_app(deployment), config=str(experiment), out=str(out), overrides=" ".join(sets),
        secure_aggregation=True, test_drop_client=2, test_drop_round=1,
    )  # fmt: skip
    assert (out / "summary.json").exists(), done.stdout[-3000:]
    (record,) = _lines(out / "metrics.jsonl")
    assert record["dp_mode"] == "distributed" and record["dp_noise_shares"] == shares_in
    # Each share carries z_min sqrt(n / r_min) C / sqrt(n) (r_min = 2 of 3): two of them carry
    # the planned z_min.
    share_std = z_min * math.sqrt(cohort / 2) * clip / math.sqrt(cohort)
    assert record["dp_share_std"] == pytest.approx(share_std)
    assert record["dp_noise_multiplier"] == pytest.approx(z_min)
    assert not {"clients", "loss", "samples", "failed"} & set(record), record
    # The released model moved by the two shares' noise: (model - start) * n is the two
    # clipped updates (norm at most 2C) plus noise of deviation sqrt(2) * share_std per entry.
    cfg = config.load(experiment, [*sets, deployment.sites()])
    start = build_experiment(cfg, log=lambda _m: None).global_model.state_dict()
    final = load_file(str(out / "model.safetensors"))
    moved = torch.cat(
        [
            ((final[k].double() - start[k].double()) * cohort).flatten()
            for k, v in start.items()
            if v.is_floating_point() and not k.endswith("running_var")  # clamped at 0
        ]
    )
    noise = math.sqrt(shares_in) * share_std
    rms = float(moved.pow(2).mean().sqrt())
    assert 0.85 * noise <= rms <= 1.15 * noise + 2 * clip / math.sqrt(moved.numel()), (rms, noise)


@pytest.mark.slow
def test_an_unregistered_site_is_refused(deployment: Deployment) -> None:
    assert deployment.rogue is not None
    assert deployment.rogue.wait(timeout=LIMIT) != 0, deployment.processes.log("rogue")
    assert "Failed to activate SuperNode" in deployment.processes.log("rogue")
    assert len(deployment.node_statuses()) == 3


@pytest.mark.slow
def test_a_superlink_without_its_database_turns_the_sites_away(deployment: Deployment) -> None:
    """Last: it ends the deployment."""
    os.kill(deployment.superlink, signal.SIGKILL)
    _wait(lambda: not _alive(deployment.superlink), "the SuperLink to die")
    command, unit_env = deployment.unit("fedssd-superlink")
    at = command.index("--database")
    in_memory = command[:at] + command[at + 2 :]
    deployment.start("superlink-in-memory", in_memory, unit_env)
    _wait(
        lambda: not any(_alive(pid) for pid in deployment.nodes.values()),
        "the SuperNodes to exit",
    )
    # Status 0, for those the tests started: a unit's Restart=on-failure would leave them down.
    children = [p for _, p in deployment.processes.started if p.pid in deployment.nodes.values()]
    for process in children:
        assert process.wait(timeout=LIMIT) == 0
