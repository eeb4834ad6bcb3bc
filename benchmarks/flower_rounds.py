"""Time the rounds of a Flower deployment on this machine: one SuperLink and 3 SuperNodes on
127.0.0.1 (insecure, no TLS: the cost measured is that of the processes, not of encryption).

Usage::

    python -m benchmarks.flower_rounds --mode shared --rounds 5 --work /tmp/flower-bench
    python -m benchmarks.flower_rounds --mode sites --rounds 5 --work /tmp/flower-bench

The job is ``flower_app/fedssd.toml`` (SSD, small CNN width 8, 1,000 Fashion-MNIST images,
3 clients, 1 local epoch) with ``evaluation.every=0 evaluation.linear_epochs=2``.

- ``shared``: every node reads the whole of Fashion-MNIST and derives its part from the run seed
  (how fedssd ran on Flower before nodes had their own data).
- ``sites``: the same 3 clients' images written once as one ``.npz`` per site; each node reads
  only its own (``data-path``), the server only a labelled evaluation set.

Prints one JSON object: the per-round seconds (``seconds`` of ``metrics.jsonl``: from sending the
round's tasks to holding the aggregated model), their mean over rounds 2..N, and the CPU seconds
the nodes' ClientApp processes used per client and round. Every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from fedssd.api import load_config, prepare_data

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERRIDES = "evaluation.every=0 evaluation.linear_epochs=2"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_sites(work: Path) -> list[Path]:
    """The 3 clients of the App's default experiment, one labelled .npz per site, and the
    server's evaluation set (the experiment's test images)."""
    data = prepare_data(load_config(REPO / "flower_app" / "fedssd.toml"), log=lambda _m: None)
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
        overrides += f' data.name=npz data.partition=clients evaluation.data="{work}/server.npz"'
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
                     "--node-config", f"client-id={k}{node_data[k]}",
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
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO / "flower_app"), "bench", "--stream",
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
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = [
        float(json.loads(line)["seconds"])
        for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "mode": mode,
        "rounds": rounds,
        "round_seconds": [round(s, 2) for s in seconds],
        "mean_round_seconds_after_first": round(sum(seconds[1:]) / max(1, len(seconds) - 1), 2),
        "wall_seconds": round(wall, 1),
        "cpu_seconds_all_processes": round(cpu, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("shared", "sites"), default="sites")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("runs/flower-bench"))
    options = parser.parse_args()
    print(json.dumps(run(options.mode, options.rounds, options.work.resolve())))


if __name__ == "__main__":
    main()
