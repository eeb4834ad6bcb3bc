"""fedssd with many clients: memory, checkpoint bytes and round time for K = 100, 1,000, 10,000.

Run ``python -m benchmarks.scaling`` (also part of ``make bench``; ``--quick`` for fewer rounds).
A stateful method (FedEMA: each client keeps an online and a target network) trains on the small
encoder of :mod:`benchmarks.bench`, 100 clients a round (``fraction = 100 / K``), with a checkpoint
after every round, through the real round loop, client store and checkpoint code. Every K runs in
a fresh process, so that its peak resident memory (``ru_maxrss``) is its own.

So that memory measures the federation and not the dataset, the images are one synthetic pool
that every client indexes into (client k holds ``images_per_client`` consecutive images of the
pool, wrapping around): the work of a round is the same for every K.

Printed and written to ``runs/bench/scaling.json`` (``--out``; ``--update-reference`` also
replaces the committed record ``benchmarks/results/scaling.json``): per K the peak RSS, the clients
seen, the states held in memory, the bytes each checkpoint wrote, seconds per round, the time in
local training, the overhead (1 - local training / round) and its store part; the same run with
every client state kept in memory (the store before it had files) for one K; the split of 60,000
labels over 10,000 clients and a round's client sampling, timed; and the projection of memory and
checkpoint bytes to a ResNet-18 from the measured size of its FedEMA client state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

if __package__ in (None, ""):
    # Run as a file (python benchmarks/scaling.py): make the repository root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import SmallEncoder, _patched, local_settings, synthetic_images
from fedssd.data.partition import label_histogram, make_partition
from fedssd.experiment import attach_extras
from fedssd.federation import round as round_module
from fedssd.federation.sampling import sample_clients
from fedssd.federation.simulator import Schedule, run_rounds
from fedssd.methods import MethodContext, build_method
from fedssd.methods.protocol import ClientHooks, Method
from fedssd.methods.server import server_state
from fedssd.models import SSLModel, build_model
from fedssd.runs.checkpoint import Checkpoint, save_checkpoint, states_folder
from fedssd.runs.store import ClientStore, encode_state
from fedssd.runtime import tune_malloc

RESULTS = Path("runs") / "bench" / "scaling.json"
# The committed record docs/benchmarks.md quotes (changes only with --update-reference).
REFERENCE = Path(__file__).resolve().parent / "results" / "scaling.json"


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """Sizes of the scaling benchmark.

    Attributes:
        mode: A name printed with the results.
        clients: The K measured.
        per_round: Clients trained per round (the fraction is ``per_round / K``).
        rounds: Rounds per K (a checkpoint after each).
        images_per_client: Images each client trains on per round (one local epoch).
        batch_size: Local mini-batch size.
        pool_images: Size of the synthetic image pool the clients index into.
        encoder: The small encoder.
        method: The stateful method.
        in_memory_clients: The K also run with every state in memory (None: not run).
        split_clients: Clients of the timed split.
        split_labels: Labels of the timed split (Fashion-MNIST's training set size).
        seed: Seed of the images, models and runs.
    """

    mode: str
    clients: tuple[int, ...] = (100, 1_000, 10_000)
    per_round: int = 100
    rounds: int = 3
    images_per_client: int = 64
    batch_size: int = 64
    pool_images: int = 4096
    encoder: SmallEncoder = dataclasses.field(default_factory=SmallEncoder)
    method: str = "fedema"
    in_memory_clients: int | None = 1_000
    split_clients: int = 10_000
    split_labels: int = 60_000
    seed: int = 0


FULL = ScalingConfig(mode="full")
QUICK = ScalingConfig(mode="quick", rounds=2, images_per_client=32, in_memory_clients=None)


def make_models(
    config: ScalingConfig, num_clients: int, device: torch.device
) -> tuple[SSLModel, SSLModel, Method]:
    """Global model, client model and the stateful method for ``num_clients`` clients."""

    def make() -> SSLModel:
        torch.manual_seed(config.seed)
        return build_model(
            encoder="small_cnn",
            width=config.encoder.width,
            projector_hidden=config.encoder.projector_hidden,
            projector_out=None,
        ).to(device)

    global_model, client_model = make(), make()
    method = build_method(
        config.method,
        {},
        MethodContext(
            num_clients=num_clients,
            feature_dim=global_model.feature_dim,
            embed_dim=global_model.embed_dim,
            seed=config.seed,
            device=device,
        ),
    )
    for model in (global_model, client_model):
        attach_extras(model, method, seed=config.seed)
    return global_model, client_model, method


def first_state_bytes(model: SSLModel, method: Method) -> int:
    """The size of the state file a client of ``method`` keeps after its first round (the hooks
    run without training: the state's size does not depend on the weights)."""
    if not isinstance(method, ClientHooks):
        return 0
    method.begin_client(model, None, client_id=0, round_index=0)
    kept, _payload = method.end_client(model, None, client_id=0, round_index=0)
    return len(encode_state(kept))


def resnet18_state_bytes(method_name: str, seed: int) -> dict[str, int]:
    """Model and client-state bytes of a CIFAR ResNet-18 under ``method_name`` (measured by
    building it and the state its first round keeps)."""
    model = build_model(encoder="resnet18")
    method = build_method(
        method_name,
        {},
        MethodContext(
            num_clients=100,
            feature_dim=model.feature_dim,
            embed_dim=model.embed_dim,
            seed=seed,
            device=torch.device("cpu"),
        ),
    )
    attach_extras(model, method, seed=seed)
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    return {"model_bytes": int(weights), "state_bytes": first_state_bytes(model, method)}


def _folder_bytes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()} if folder.is_dir() else {}


def measure_clients(
    config: ScalingConfig, num_clients: int, *, on_disk: bool, run_dir: Path
) -> dict[str, Any]:
    """Train ``config.rounds`` rounds with ``num_clients`` clients in this process.

    Args:
        config: Sizes.
        num_clients: K.
        on_disk: Keep at most one round's client states in memory, the rest in files (False:
            every state in memory, as before the store had files).
        run_dir: Where the checkpoints and state files go.

    Returns:
        The figures of this K (see the module docstring).
    """
    tune_malloc()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    images = synthetic_images(config.pool_images, config.seed, device)
    span = torch.arange(config.images_per_client)
    client_indices = [
        (span + k * config.images_per_client) % config.pool_images for k in range(num_clients)
    ]
    global_model, client_model, method = make_models(config, num_clients, device)
    store = ClientStore()
    if on_disk:
        store.spill(states_folder(run_dir), capacity=config.per_round)
    seconds = {"local_train": 0.0, "store": 0.0, "checkpoint": 0.0}

    def timed(part: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            seconds[part] += time.perf_counter() - start
            return out

        return call

    store.get = timed("store", store.get)  # type: ignore[method-assign]
    store.put = timed("store", store.put)  # type: ignore[method-assign]
    history: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    in_memory: list[int] = []
    seen: set[int] = set()

    def checkpoint(record: dict[str, Any], model: nn.Module) -> None:
        in_memory.append(store.in_memory)
        seen.update(record["clients"])
        before = _folder_bytes(states_folder(run_dir))
        start = time.perf_counter()
        folder = save_checkpoint(
            run_dir,
            Checkpoint(
                rounds_done=int(record["round"]),
                model={k: v.detach() for k, v in model.state_dict().items()},
                server=server_state(method),
                store=store,
                history=history[: int(record["round"])],
                identity={"benchmark": "scaling"},
            ),
            keep=2,
        )
        took = time.perf_counter() - start
        seconds["checkpoint"] += took
        after = _folder_bytes(states_folder(run_dir))
        states = sum(size for name, size in after.items() if name not in before)
        own = sum(_folder_bytes(folder).values())
        checkpoints.append(
            {
                "round": int(record["round"]),
                "clients_trained": len(record["clients"]),
                "state_files_bytes": states,
                "checkpoint_folder_bytes": own,
                "bytes_written": states + own,
                "seconds": took,
            }
        )

    schedule = Schedule(
        num_clients=num_clients,
        fraction=config.per_round / num_clients,
        rounds=config.rounds,
        lr=0.05,
        lr_schedule="constant",
        seed=config.seed,
    )
    settings = local_settings(config.batch_size)
    with _patched(round_module, "local_train", lambda inner: timed("local_train", inner)):
        start = time.perf_counter()
        run_rounds(
            global_model=global_model,
            client_model=client_model,
            method=method,
            images=images,
            client_indices=client_indices,
            schedule=schedule,
            settings=settings,
            store=store,
            history=history,
            callbacks=[checkpoint],
        )
        wall = time.perf_counter() - start
    loop = wall - seconds["checkpoint"]
    state_bytes = first_state_bytes(client_model, method)
    return {
        "clients": num_clients,
        "on_disk": on_disk,
        "clients_per_round": config.per_round,
        "rounds": config.rounds,
        "clients_seen": len(seen),
        "states_in_memory_after_each_round": in_memory,
        "state_bytes": state_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "round_s": loop / config.rounds,
        "local_train_s_per_round": seconds["local_train"] / config.rounds,
        "store_s_per_round": seconds["store"] / config.rounds,
        "overhead": 1.0 - seconds["local_train"] / loop,
        "store_share_of_round": seconds["store"] / loop,
        "checkpoint_s_mean": seconds["checkpoint"] / config.rounds,
        "overhead_with_checkpoints": 1.0 - seconds["local_train"] / wall,
        "checkpoints": checkpoints,
        "state_files_on_disk": len(_folder_bytes(states_folder(run_dir))),
    }


def measure_split(config: ScalingConfig) -> dict[str, Any]:
    """Seconds to split ``config.split_labels`` labels over ``config.split_clients`` clients by
    each scheme (one Dirichlet draw: ``min_size = 0``), to count their labels, to make their
    index tensors, and to sample one round's clients."""
    labels = np.random.default_rng(config.seed).integers(0, 10, config.split_labels)
    k = config.split_clients
    result: dict[str, Any] = {"clients": k, "labels": config.split_labels}
    for name, options in (
        ("iid", {}),
        ("dirichlet", {"alpha": 0.5, "min_size": 0}),
        ("pathological", {"classes_per_client": 2}),
    ):
        start = time.perf_counter()
        parts = make_partition(labels, scheme=name, num_clients=k, seed=config.seed, **options)
        split = time.perf_counter() - start
        start = time.perf_counter()
        label_histogram(labels, parts, num_classes=10)
        [torch.from_numpy(p).long() for p in parts]
        rest = time.perf_counter() - start
        result[name] = {"split_s": split, "histogram_and_tensors_s": rest}
    rounds = 100
    start = time.perf_counter()
    for round_index in range(rounds):
        sample_clients(
            num_clients=k,
            fraction=config.per_round / k,
            round_index=round_index,
            seed=config.seed,
            shuffle=True,
        )
    result["sampling_s_per_round"] = (time.perf_counter() - start) / rounds
    return result


def _child(config: ScalingConfig, num_clients: int, on_disk: bool) -> dict[str, Any]:
    """Run :func:`measure_clients` in a fresh interpreter and return its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        command = [sys.executable, "-m", "benchmarks.scaling", "--one", str(num_clients)]
        command += ["--out", str(out), "--run-dir", str(Path(tmp) / "run")]
        command += ["--config-json", json.dumps(dataclasses.asdict(config))]
        command += [] if on_disk else ["--in-memory"]
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": path})
        figures: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        return figures


def run(config: ScalingConfig, *, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Every figure of the module docstring, each K in its own process."""
    mb = 1e6
    say(
        f"many clients ({config.mode}): {config.method}, small_cnn width {config.encoder.width}, "
        f"{config.per_round} clients a round x {config.images_per_client} images, "
        f"{config.rounds} rounds, a checkpoint after each"
    )
    rows = []
    for num_clients in config.clients:
        row = _child(config, num_clients, on_disk=True)
        rows.append(row)
        written = np.mean([c["bytes_written"] for c in row["checkpoints"]])
        held = max(row["states_in_memory_after_each_round"])
        say(
            f"   K={num_clients:>6} | peak RSS {row['peak_rss_bytes'] / mb:6.0f} MB | seen "
            f"{row['clients_seen']:>4}, in memory <= {held} | checkpoint {written / mb:5.0f} MB "
            f"({row['checkpoints'][-1]['clients_trained']} clients) | round "
            f"{row['round_s']:6.2f} s, overhead {100 * row['overhead']:5.2f}% (store "
            f"{100 * row['store_share_of_round']:4.2f}%) | checkpoint "
            f"{row['checkpoint_s_mean']:.2f} s"
        )
    before = None
    if config.in_memory_clients is not None:
        before = _child(config, config.in_memory_clients, on_disk=False)
        say(
            f"   K={config.in_memory_clients:>6}, every state in memory: peak RSS "
            f"{before['peak_rss_bytes'] / mb:.0f} MB with {before['clients_seen']} clients seen"
        )
    split = measure_split(config)
    say(
        f"   {split['clients']} clients over {split['labels']} labels: split "
        + ", ".join(
            f"{name} {split[name]['split_s']:.3f} s"
            for name in ("iid", "dirichlet", "pathological")
        )
        + f"; sampling a round {1e3 * split['sampling_s_per_round']:.2f} ms"
    )
    resnet = resnet18_state_bytes(config.method, config.seed)
    projection = []
    for row in rows:
        k = row["clients"]
        projection.append(
            {
                "clients": k,
                "state_files_on_disk_bytes": k * resnet["state_bytes"],
                "states_in_memory_bytes": min(k, config.per_round) * resnet["state_bytes"],
                "states_in_memory_before_bytes_after_rounds": row["clients_seen"]
                * resnet["state_bytes"],
                "checkpoint_bytes_per_round": config.per_round * resnet["state_bytes"],
            }
        )
    say(
        f"   ResNet-18 ({config.method}): a client state is {resnet['state_bytes'] / mb:.0f} MB "
        f"(model {resnet['model_bytes'] / mb:.0f} MB): in memory {config.per_round} states = "
        f"{config.per_round * resnet['state_bytes'] / 1e9:.1f} GB whatever K; on disk "
        + ", ".join(
            f"K={p['clients']}: {p['state_files_on_disk_bytes'] / 1e9:.0f} GB" for p in projection
        )
    )
    flat = None
    by_k = {row["clients"]: row for row in rows}
    if 1_000 in by_k and 10_000 in by_k:
        flat = by_k[10_000]["peak_rss_bytes"] / by_k[1_000]["peak_rss_bytes"]
    # A state file's size varies by a few bytes with its scalars' digits.
    proportional = all(
        abs(c["state_files_bytes"] / (c["clients_trained"] * row["state_bytes"]) - 1) < 0.01
        for row in rows
        for c in row["checkpoints"]
    )
    largest = rows[-1]
    return {
        "mode": config.mode,
        "config": dataclasses.asdict(config),
        "rows": rows,
        "in_memory": before,
        "split": split,
        "resnet18": resnet,
        "projection_resnet18": projection,
        "targets": {
            "peak_rss_10000_over_1000": {
                "value": flat,
                "target": "<= 1.2",
                "met": flat is not None and flat <= 1.2,
            },
            "checkpoint_state_bytes_proportional_to_clients_trained": {
                "value": proportional,
                "met": proportional,
            },
            "round_overhead_largest_k": {
                "clients": largest["clients"],
                "value": largest["overhead"],
                "target": "<= 0.10",
                "met": largest["overhead"] <= 0.10,
            },
            "split_and_sampling_10000_clients_s": {
                "value": max(split[n]["split_s"] for n in ("iid", "dirichlet", "pathological"))
                + split["sampling_s_per_round"],
                "target": "well under 1 s",
            },
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.scaling [--quick] [--out PATH]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller clients")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    parser.add_argument(
        "--update-reference",
        action="store_true",
        help=f"also replace the committed record {REFERENCE.relative_to(REFERENCE.parents[2])}",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.config_json:
        given = json.loads(args.config_json)
        config = ScalingConfig(
            **{
                **given,
                "clients": tuple(given["clients"]),
                "encoder": SmallEncoder(**given["encoder"]),
            }
        )
    if args.one is not None:
        figures = measure_clients(
            config, args.one, on_disk=not args.in_memory, run_dir=args.run_dir
        )
    else:
        figures = run(config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if args.one is None:
        print(f"wrote {args.out}")
    if args.update_reference and args.one is None:
        REFERENCE.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        print(f"updated the committed record {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
