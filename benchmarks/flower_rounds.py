"""Time the rounds of a Flower deployment on this machine: one SuperLink and 3 SuperNodes on
127.0.0.1 (insecure, no TLS: the cost measured is that of the processes, not of encryption).

Usage::

    python -m benchmarks.flower_rounds --mode shared --rounds 5 --work /tmp/flower-bench
    python -m benchmarks.flower_rounds --mode sites --rounds 5 --work /tmp/flower-bench

The job is the Flower App's ``fedssd.toml`` (``src/fedssd/configs/flower_app/``; SSD, small CNN
width 8, 1,000 Fashion-MNIST images,
3 clients, 1 local epoch) with ``evaluation.every=0 evaluation.linear_epochs=2``.

- ``shared``: every node reads the whole of Fashion-MNIST and derives its part from the run seed
  (how fedssd ran on Flower before nodes had their own data).
- ``sites``: the same 3 clients' images written once as one ``.npz`` per site; each node reads
  only its own (``data-path``), the server only a labelled evaluation set.

With ``--node-startup N`` it times instead, in N fresh processes, what a node's ClientApp
process does before it trains (imports, data, models). Prints one JSON object: the per-round
seconds (``seconds`` of ``metrics.jsonl``: from sending the round's tasks to holding the
aggregated model), their mean over rounds 2..N, and the wall time of the whole run. Every
process it starts is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedssd.data.federated import prepare_data
from fedssd.runs.resolve import load_config

REPO = Path(__file__).resolve().parents[1]
FLOWER_APP = REPO / "src" / "fedssd" / "configs" / "flower_app"
BIN = Path(sys.executable).parent
OVERRIDES = "evaluation.every=0 evaluation.linear_epochs=2"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_sites(work: Path) -> list[Path]:
    """The 3 clients of the App's default experiment, one labelled .npz per site, and the
    server's evaluation set (the experiment's test images)."""
    data = prepare_data(
        load_config(FLOWER_APP / "fedssd.toml"),
        log=lambda _m: None,
    )
    images, labels = data.dataset.x_train, data.dataset.y_train
    sites = []
    for k, part in enumerate(data.client_indices):
        path = work / f"site{k}.npz"
        np.savez(path, x_train=images[part, 0].numpy(), y_train=labels[part].numpy())
        sites.append(path)
    test = data.test_indices
    np.savez(
        work / "server.npz",
        x_train=data.dataset.x_test[test, 0].numpy(),
        y_train=data.dataset.y_test[test].numpy(),
    )
    return sites


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(
            args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def run(mode: str, rounds: int, work: Path) -> dict[str, object]:
    """Start the federation, run ``rounds`` rounds, and return the timings."""
    work.mkdir(parents=True, exist_ok=True)
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = dict(os.environ, FLWR_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    overrides = OVERRIDES
    node_data = [""] * 3
    if mode == "sites":
        sites = _write_sites(work)
        node_data = [f' data-path="{site}"' for site in sites]
        overrides += (
            " data.name=npz data.partition=clients data.train_subset=0"
            f" evaluation.data={work}/server.npz"
        )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        processes.append(
            _start(
                [str(BIN / "flower-superlink"), "--insecure",
                 "--disable-runtime-dependency-installation",
                 "--host", "127.0.0.1", "--port", str(port)],
                work / "superlink.log",
                env,
            )
        )  # fmt: skip
        time.sleep(5)
        for k in range(3):
            processes.append(
                _start(
                    [str(BIN / "flower-supernode"), "--insecure",
                     "--superlink", f"127.0.0.1:{port}",
                     "--node-config", f"client-id={k} partition-id={k}{node_data[k]}",
                     "--port", str(_free_port())],
                    work / f"supernode{k}.log",
                    env,
                )
            )  # fmt: skip
        out = work / f"run-{mode}"
        run_config = (
            f'out="{out}" overwrite=true '
            f'overrides="{overrides.replace(chr(34), chr(92) + chr(34))} '
            f'federation.rounds={rounds}"'
        )
        started = time.perf_counter()
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(FLOWER_APP), "bench", "--stream",
             "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
        deadline = time.monotonic() + 120
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        wall = time.perf_counter() - started
    finally:
        _stop(processes)
    seconds = [
        float(json.loads(line)["seconds"])
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "mode": mode,
        "rounds": rounds,
        "round_seconds": [round(s, 2) for s in seconds],
        "mean_round_seconds_after_first": round(sum(seconds[1:]) / max(1, len(seconds) - 1), 2),
        "wall_seconds": round(wall, 1),
    }


# What a node's ClientApp process does before it trains, timed in a fresh interpreter: the
# imports, then the experiment (data, models, method) of the App's default job.
_STARTUP = """
import json, resource, sys, time
started = time.perf_counter()
import torch
from fedssd.flower import client_app
from fedssd.experiment import build_experiment
from fedssd.runs.resolve import load_config
imported = time.perf_counter()
mode, config, site = sys.argv[1:]
if mode == "sites":
    from fedssd.data.federated import node_data
    cfg = load_config(
        config, overrides=["data.name=npz", "data.partition=clients", "data.train_subset=0"]
    )
    experiment = build_experiment(cfg, log=print, data=node_data(cfg, 0, site, log=print))
else:
    experiment = build_experiment(load_config(config), log=print)
built = time.perf_counter()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"imports_s": imported - started, "experiment_s": built - imported,
                  "cpu_s": usage.ru_utime + usage.ru_stime}))
"""


def node_startup(mode: str, work: Path, repeats: int) -> dict[str, float]:
    """The median over ``repeats`` fresh processes of a node's set-up before training."""
    work.mkdir(parents=True, exist_ok=True)
    site = _write_sites(work)[0] if mode == "sites" else Path("-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    samples = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", _STARTUP, mode, str(FLOWER_APP / "fedssd.toml"),
             str(site)],
            env=env, capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        samples.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        key: round(float(np.median([sample[key] for sample in samples])), 3) for key in samples[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("shared", "sites"), default="sites")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("runs/flower-bench"))
    parser.add_argument(
        "--node-startup",
        type=int,
        default=0,
        metavar="N",
        help="instead of a federation, time a node's set-up in N fresh processes (median)",
    )
    options = parser.parse_args()
    work = options.work.resolve()
    if options.node_startup:
        print(
            json.dumps(
                {"mode": options.mode, **node_startup(options.mode, work, options.node_startup)}
            )
        )
    else:
        print(json.dumps(run(options.mode, options.rounds, work)))


if __name__ == "__main__":
    main()
