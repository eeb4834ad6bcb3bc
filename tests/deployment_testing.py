"""docs/deployment.md's federation, running, for the deployment tests
(tests/flower/test_deployment.py and test_deployment_recovery.py).

:func:`running` runs the page's commands as they are written there (:mod:`deployment_walkthrough`:
the page's ports replaced by free ones, this venv instead of the page's install) up to a section:
three sites of Fashion-MNIST PNG files, a SuperLink with TLS, SuperNode authentication and
``--database``, three SuperNodes each with its own ``data-path``, ``state-dir`` and ``FLWR_HOME``,
and, when it runs up to "9. Stop", the page's 3-round SSD run. A Python audit hook
(``sitecustomize``, in every process the page and the tests start) logs every file opened under
the page's folder. Each test module runs one such deployment, so that the two run side by side
under pytest-xdist; its tests share that SuperLink and those SuperNodes.

Nothing waits for time to pass: the hooks of :mod:`hooks_app` act at known rounds, and the
tests wait only for conditions (a process gone, a node offline, a file written), each with a
limit that only a hung test reaches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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

import torch
from safetensors.torch import load_file

import deployment_walkthrough as walkthrough
from fedssd import api
from flower_testing import Processes

FLOWER_TESTS = Path(__file__).resolve().parent / "flower"  # hooks_app.py
SITES = ("a", "b", "c")
LIMIT = 600.0  # seconds before a wait gives up: only a hung deployment gets there

# Logs every file a process opens under FEDSSD_TEST_WATCH, with the process's command line. In a
# SuperLink it also raises SQLite's busy timeout from Flower's 5 s to 120 s: with the rest of the
# suite on the same 2 cores, a SuperLink thread holding its database's write lock can be kept off
# the CPU for over 5 s, and Flower 1.42 then answers a site's upload with "database is locked"
# (HTTP 500) and does not retry it, so the run counts that site as failed (seen in a clean-clone
# `make test`: one site lost in a round of two tests).
SITECUSTOMIZE = textwrap.dedent(
    """
    import os, sys
    if sys.argv and os.path.basename(sys.argv[0]) == "flower-superlink":
        import flwr.supercore.constant as _flower
        _flower.SQLITE_PRAGMAS = tuple(
            (key, "120000" if key == "busy_timeout" else value)
            for key, value in _flower.SQLITE_PRAGMAS
        )
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
        return run_id_of(done.stdout)

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
        return unit(name, self.folder, self.ports)

    def experiment(self, name: str, method: str, rounds: int) -> Path:
        path = self.folder / "coordinator" / "tests" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(EXPERIMENT.format(method=method, rounds=rounds, folder=self.folder))
        return path

    def sites(self) -> str:
        """The in-process simulator's override naming the page's sites."""
        folders = [str(self.folder / f"site-{s}" / "images") for s in SITES]
        return "data.clients=" + json.dumps(folders)


def tails(folder: Path) -> str:
    """The ends of the walk-through's log and of its SuperLink's and SuperNodes' logs."""
    logs = [folder / "walkthrough.log", folder / "coordinator" / "superlink.log"]
    logs += [folder / f"site-{site}" / "supernode.log" for site in SITES]
    return "\n".join(
        f"--- {log.relative_to(folder)}:\n{log.read_text(errors='replace')[-2500:]}"
        for log in logs
        if log.exists()
    )


def run_id_of(output: str) -> int:
    for line in output.splitlines():
        if line.startswith("Successfully started run "):
            return int(line.split()[3])
    raise AssertionError(f"no run id in: {output[-2000:]}")


def unit(name: str, folder: Path, ports: dict[int, int]) -> tuple[list[str], dict[str, str]]:
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


def marked(marker: str) -> list[int]:
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


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition: Callable[[], bool], what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {LIMIT:.0f}s waiting for {what}")
        time.sleep(poll)


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def in_process(deployment: Deployment, config_path: Path, out: Path) -> dict[str, torch.Tensor]:
    result = api.train(config_path, overrides=[deployment.sites()], out=out, log=None)
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def assert_same_weights(expected: dict[str, torch.Tensor], path: Path) -> None:
    got = load_file(path)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def hooks_app(deployment: Deployment) -> Path:
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
        keys = (
            "kill-client",
            "kill-round",
            "drop-client",
            "drop-round",
            "hold-round",
            "crash-round",
        )
        text += "".join(f"test-{key} = -1\n" for key in keys)
        text += 'test-hold-file = ""\ntest-crash-pidfile = ""\n'
        (app / "pyproject.toml").write_text(text)
        shutil.copy(FLOWER_TESTS / "hooks_app.py", app / "hooks_app.py")
    return app


def hook_env(deployment: Deployment) -> dict[str, str]:
    keys = ("PYTHONPATH", "FEDSSD_TEST_WATCH", "FEDSSD_TEST_OPEN_LOG", "OMP_NUM_THREADS")
    return {key: deployment.env[key] for key in keys}


@contextlib.contextmanager
def running(base: Path, *, until: str, rogue: bool = False) -> Iterator[Deployment]:
    """The page's commands run in ``base / "walkthrough"`` up to the section whose heading starts
    with ``until``; its SuperLink and SuperNodes then keep running for the tests, and every
    process is stopped at the end. With ``rogue``, a SuperNode whose key was never registered
    tries once while the tests go on (:attr:`Deployment.rogue`)."""
    folder = base / "walkthrough"
    hooks = base / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit = base / "audit.log"
    page = walkthrough.PAGE.read_text(encoding="utf-8")
    ports = walkthrough.free_mapping(page)
    python_path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p)
    extra = {
        "PYTHONPATH": python_path,
        "FEDSSD_TEST_WATCH": str(folder),
        "FEDSSD_TEST_OPEN_LOG": str(audit),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    env = walkthrough.environment(install=False, extra=extra)
    logs = base / "logs"
    logs.mkdir()
    processes = Processes(logs)
    run = walkthrough.start(folder, install=False, until=until, mapping=ports, env=env)
    with walkthrough.session(run):
        try:
            code = run.wait(timeout=2 * LIMIT)
            assert code == 0, f"the page's commands failed ({code}):\n{tails(folder)}"
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
            if rogue:
                deployment.rogue = _start_rogue(deployment)
            yield deployment
        finally:
            processes.close()
            # The ServerApps and ClientApps that Flower started in sessions of their own.
            for pid in marked(f"FEDSSD_TEST_WATCH={folder}"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _start_rogue(deployment: Deployment) -> subprocess.Popen[bytes]:
    """A SuperNode started by the page's unit with a key the SuperLink never registered."""
    key = deployment.folder / "rogue" / "supernode"
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
    return deployment.start("rogue", command, unit_env)
