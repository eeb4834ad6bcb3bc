"""fedssd's speed figures, measured side by side in one process (issue 6).

Run ``python -m benchmarks.bench`` (``make bench``) or ``python -m benchmarks.bench --quick``
(``make bench-quick``, under 2 minutes on a 2-core CPU). Every figure is printed with the machine,
the torch version, the thread count and the configuration, and written to
``runs/bench/latest.json`` under the current folder (untracked; ``--out`` chooses another file).
The committed record ``benchmarks/results/latest.json`` changes only with ``--update-reference``:

1. ``train_efficiency``: SSD local training (batched two-view augmentation, every loss term,
   SGD step: the real :func:`fedssd.federation.client.local_train`) divided by bare model
   forward + backward on already-made views of the same batch size; the two are timed back to
   back in each repetition and the median of the per-repetition ratios is reported, so load
   from other processes hits both alike.
2. ``round_overhead`` (K = 50 clients of about 1,000 images) and ``round_overhead_small_clients``
   (K = 200 of about 50): the real round loop :func:`fedssd.federation.simulator.run_rounds` with
   its ``local_train`` wrapped by a timer; overhead = 1 - time inside local training / wall time.
3. ``speedup_vs_dataloader``: the same SSD local training fed by per-image augmentation in a
   ``torch.utils.data.DataLoader`` (:mod:`benchmarks.reference`, the released code's way).
4. ``gpu``: ResNet-18 two-view SSD in bf16 with channels_last (and torch.compile when it helps),
   images per second, fraction of the card's bf16 peak, projected wall time of the paper's
   cross-silo protocol, and several clients trained concurrently on CUDA streams. Without CUDA a
   tiny CPU version runs so that the code stays working, and the figures are null with a reason.
5. ``scaling``: round time for K = 10, 50, 200 and two dataset sizes.
6. ``busy_machine``: ``fedssd train --config smoke --set federation.rounds=3`` as a user runs it,
   in fresh processes, alternately on the machine as it is and beside one busy process
   (``python -c "while True: pass"``) that the benchmark starts and stops; the figure is the
   median of the busy / idle ratios of the runs' ``train_seconds``. The same pairs with
   libgomp's own wait policy (``GOMP_SPINCOUNT=300000``, what PyTorch's threads did before
   :mod:`fedssd.openmp`) show what the default costs on the idle machine and saves on the busy one.

Many clients (K up to 10,000, memory and checkpoint bytes) are :mod:`benchmarks.scaling`.

Images are synthetic uint8 ``3 x 32 x 32`` tensors (CIFAR-sized); speed does not depend on content.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from fedssd.data.augment import SSL_AUGMENT, two_views
from fedssd.federation import round as round_module
from fedssd.federation import server
from fedssd.federation.client import LocalSettings, local_train
from fedssd.federation.simulator import Schedule, run_rounds
from fedssd.methods import MethodContext, build_method
from fedssd.methods.protocol import Method
from fedssd.models import SSLModel, build_model
from fedssd.openmp import USER_SETTINGS
from fedssd.runs.outputs import append_jsonl
from fedssd.runtime import DESCRIPTION, tune_malloc

# Each run writes here (relative to the folder it runs in; runs/ is not tracked by git) ...
RESULTS = Path("runs") / "bench" / "latest.json"
# ... and the committed record of the figures docs/benchmarks.md quotes changes only on request.
REFERENCE = Path(__file__).resolve().parent / "results" / "latest.json"

# Dense bf16 tensor-core peak in TFLOP/s (vendor datasheets, without sparsity), matched in order
# against torch.cuda.get_device_name(): the first key found in the name wins.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

# The paper's cross-silo protocol (docs/methods.md, "The paper's protocol"): a CIFAR-sized
# training set seen 5 local epochs per round for 100 rounds, each image as two views.
PAPER_IMAGES = 50_000
PAPER_ROUNDS = 100
PAPER_EPOCHS = 5


@dataclasses.dataclass(frozen=True)
class SmallEncoder:
    """The CPU model of the round benchmarks (the demo's small CNN and SSD with every term).

    Attributes:
        width: First-stage width of the small CNN (feature dimension ``4 * width``).
        projector_hidden: Hidden width of the projector.
    """

    width: int = 16
    projector_hidden: int = 512


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Sizes of every measurement (``quick`` and ``full`` presets below; tests use tinier ones).

    Attributes:
        mode: A name printed with the results.
        encoder: The small encoder of the CPU measurements.
        batch_size: Local mini-batch size (the paper's 128).
        efficiency_batches: Mini-batches per timed repetition of the efficiency measurement: one
            ``local_train`` call, whose fixed costs (a fresh optimizer, the result) these batches
            share as a client's epoch does (39 batches per epoch in the paper's cross-silo runs).
        efficiency_reps: Alternating repetitions of bare and SSD training.
        overhead_clients: ``(K, images per client)`` of the ``round_overhead`` case.
        small_clients: ``(K, images per client)`` of ``round_overhead_small_clients``.
        overhead_rounds: Rounds per round-loop measurement.
        scaling_clients: The K of the scaling table.
        scaling_images: Dataset sizes of the scaling table.
        dataloader_images: Images per epoch in the DataLoader comparison.
        dataloader_workers: DataLoader worker counts tried for the reference.
        dataloader_reps: Alternating repetitions of the fast path and the reference.
        gpu_steps: Timed steps on the GPU (or the tiny CPU stand-in).
        gpu_clients: Clients trained concurrently in the multi-client measurement.
        gpu_compile: Try torch.compile on CUDA.
        busy_reps: Pairs of idle and busy runs of the ``busy_machine`` figure (0: not measured).
        busy_overrides: The ``--set`` overrides of its smoke run.
        busy_compare: Also time the pairs with libgomp's own wait policy.
        seed: Seed of the synthetic images and the models.
    """

    mode: str
    encoder: SmallEncoder = SmallEncoder()
    batch_size: int = 128
    efficiency_batches: int = 16
    efficiency_reps: int = 11
    overhead_clients: tuple[int, int] = (50, 1000)
    small_clients: tuple[int, int] = (200, 50)
    overhead_rounds: int = 2
    scaling_clients: tuple[int, ...] = (10, 50, 200)
    scaling_images: tuple[int, ...] = (10_000, 50_000)
    dataloader_images: int = 2048
    dataloader_workers: tuple[int, ...] = (0, 2)
    dataloader_reps: int = 2
    gpu_steps: int = 30
    gpu_clients: int = 4
    gpu_compile: bool = True
    busy_reps: int = 3
    busy_overrides: tuple[str, ...] = ("federation.rounds=3",)
    busy_compare: bool = True
    seed: int = 0


FULL = BenchConfig(mode="full")
QUICK = BenchConfig(
    mode="quick",
    efficiency_batches=8,
    efficiency_reps=7,
    overhead_clients=(50, 200),
    small_clients=(200, 50),
    overhead_rounds=1,
    scaling_clients=(10, 50, 200),
    scaling_images=(2_000, 10_000),
    dataloader_images=512,
    dataloader_workers=(0,),
    dataloader_reps=1,
    gpu_steps=3,
    gpu_clients=2,
    gpu_compile=False,
    busy_reps=1,
)


# ----------------------------------------------------------------------------- building blocks


def synthetic_images(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, 3, 32, 32)`` uint8 random images."""
    rng = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=rng, dtype=torch.uint8).to(device)


def small_setup(
    encoder: SmallEncoder, num_clients: int, seed: int, device: torch.device
) -> tuple[SSLModel, SSLModel, Method, dict[str, Any]]:
    """Global model, client model and SSD for ``num_clients`` clients, and a description.

    SSD's DSR gives every client at least one embedding dimension, and projector distillation
    needs the embedding as wide as the encoder output. When K exceeds the small encoder's
    feature dimension the projector is widened to 256 and PD is switched off, as the config
    check tells a user to do; the description says so.
    """
    feature_dim = 4 * encoder.width
    wide = num_clients > feature_dim
    options: dict[str, Any] = {"pd": False} if wide else {}
    projector_out = 256 if wide else None

    def make() -> SSLModel:
        torch.manual_seed(seed)
        return build_model(
            encoder="small_cnn",
            width=encoder.width,
            projector_hidden=encoder.projector_hidden,
            projector_out=projector_out,
        ).to(device)

    global_model, client_model = make(), make()
    context = MethodContext(
        num_clients=num_clients,
        feature_dim=global_model.feature_dim,
        embed_dim=global_model.embed_dim,
        seed=seed,
        device=device,
    )
    method = build_method("ssd", options, context)
    description = {
        "encoder": f"small_cnn width {encoder.width}",
        "projector": f"{global_model.feature_dim}-{encoder.projector_hidden}-"
        f"{global_model.embed_dim}",
        "method": "ssd (align, uniformity, DSR, PD)"
        if not wide
        else "ssd (align, uniformity, DSR; PD off: K > feature dim)",
    }
    return global_model, client_model, method, description


def local_settings(batch_size: int, autocast: torch.dtype | None = None) -> LocalSettings:
    """The paper's local optimiser and augmentation, one epoch."""
    return LocalSettings(
        epochs=1,
        batch_size=batch_size,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        augment=SSL_AUGMENT,
        autocast_dtype=autocast,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(model: nn.Module, view1: torch.Tensor, view2: torch.Tensor) -> None:
    """Model forward on both views and backward of a trivial scalar (the efficiency baseline)."""
    h1, z1 = model(view1)
    h2, z2 = model(view2)
    loss = h1.float().mean() + z1.float().mean() + h2.float().mean() + z2.float().mean()
    model.zero_grad(set_to_none=True)
    loss.backward()


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


# ----------------------------------------------------------------------------- 1. efficiency


def measure_efficiency(
    model: nn.Module,
    method: Method,
    *,
    batch_size: int,
    batches: int,
    reps: int,
    seed: int,
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> dict[str, Any]:
    """Local-training efficiency: SSD local training vs bare forward + backward, alternated.

    Args:
        model: The model to train (modified).
        method: The SSD method.
        batch_size: Mini-batch size.
        batches: Mini-batches per timed repetition.
        reps: Repetitions; each times bare, ``local_train`` and augmentation alone once.
        seed: Seed of the images.
        device: Where to run.
        autocast: Mixed-precision dtype, or None.

    Returns:
        ``efficiency`` and per-batch milliseconds of each part.
    """
    images = synthetic_images(batch_size * batches, seed, device)
    indices = torch.arange(images.shape[0], device=device)
    settings = local_settings(batch_size, autocast)
    rng = torch.Generator(device=device).manual_seed(seed)
    views = [
        two_views(images[i * batch_size : (i + 1) * batch_size], SSL_AUGMENT, generator=rng)
        for i in range(batches)
    ]
    amp: contextlib.AbstractContextManager[object] = (
        torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    )
    model.train()

    def bare() -> None:
        with amp:
            for view1, view2 in views:
                bare_step(model, view1, view2)

    def augment_only() -> None:
        for i in range(batches):
            two_views(images[i * batch_size : (i + 1) * batch_size], SSL_AUGMENT, generator=rng)

    def ssd() -> None:
        local_train(
            model,
            method,
            images,
            indices,
            settings=settings,
            generator=rng,
            client_id=0,
            position=0,
        )

    timings: dict[str, list[float]] = {"bare": [], "augment": [], "ssd": []}
    for fn in (bare, ssd):  # warm-up
        fn()
    for _ in range(reps):
        for name, fn in (("bare", bare), ("ssd", ssd), ("augment", augment_only)):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            timings[name].append((time.perf_counter() - start) / batches)
    bare_s, ssd_s, aug_s = (_median(timings[k]) for k in ("bare", "ssd", "augment"))
    # Each repetition times bare and SSD back to back; the median of those paired ratios is
    # less disturbed by other load on the machine than a ratio of separate medians.
    ratios = [b / s for b, s in zip(timings["bare"], timings["ssd"], strict=True)]
    return {
        "efficiency": _median(ratios),
        "efficiency_per_rep": ratios,
        "bare_ms_per_batch": 1e3 * bare_s,
        "ssd_ms_per_batch": 1e3 * ssd_s,
        "augment_ms_per_batch": 1e3 * aug_s,
        "loss_and_step_ms_per_batch": 1e3 * (ssd_s - bare_s - aug_s),
        "ssd_image_pairs_per_s": batch_size / ssd_s,
        "bare_image_pairs_per_s": batch_size / bare_s,
        "batch_size": batch_size,
        "batches_per_rep": batches,
        "reps": reps,
    }


# ----------------------------------------------------------------------------- 2. round overhead


@contextlib.contextmanager
def _patched(module: Any, name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    """Replace ``module.name`` by ``wrap(original)`` for the duration of the block."""
    if not hasattr(module, name):
        raise RuntimeError(
            f"{module.__name__}.{name} is gone; update benchmarks/bench.py to the new round loop."
        )
    original = getattr(module, name)
    setattr(module, name, wrap(original))
    try:
        yield
    finally:
        setattr(module, name, original)


def measure_rounds(
    *,
    encoder: SmallEncoder,
    num_clients: int,
    images_per_client: int,
    rounds: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Run the real round loop with timers around local training and the other parts.

    Args:
        encoder: The small encoder.
        num_clients: K; every client trains every round (cross-silo).
        images_per_client: Images per client.
        rounds: Rounds.
        batch_size: Local mini-batch size.
        seed: Seed of the images, models and run.
        device: Where to run.

    Returns:
        ``overhead`` (1 - local training / wall time), round seconds and the overhead's parts.
    """
    images = synthetic_images(num_clients * images_per_client, seed, device)
    client_indices = list(torch.arange(images.shape[0], device=device).split(images_per_client))
    global_model, client_model, method, description = small_setup(
        encoder, num_clients, seed, device
    )
    seconds = {
        "local_train": 0.0,
        "load_state": 0.0,
        "seeding": 0.0,
        "callbacks": 0.0,
        "aggregation": 0.0,
    }

    def timed(part: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A wrapper that adds the wrapped function's wall time to ``seconds[part]``."""

        def wrap(inner: Callable[..., Any]) -> Callable[..., Any]:
            def timed_call(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                out = inner(*args, **kwargs)
                seconds[part] += time.perf_counter() - start
                return out

            return timed_call

        return wrap

    client_model.load_state_dict = timed("load_state")(client_model.load_state_dict)  # type: ignore[method-assign]

    with tempfile.TemporaryDirectory() as tmp:
        metrics_path = Path(tmp) / "metrics.jsonl"
        log = io.StringIO()

        # The round callbacks a run without evaluation has: the metrics file and a progress line.
        def write_metrics(record: dict[str, Any], _model: nn.Module) -> None:
            start = time.perf_counter()
            append_jsonl(metrics_path, record)
            seconds["callbacks"] += time.perf_counter() - start

        def progress(record: dict[str, Any], _model: nn.Module) -> None:
            start = time.perf_counter()
            print(f"round {record['round']} loss {record['loss']:.4f}", file=log)
            seconds["callbacks"] += time.perf_counter() - start

        schedule = Schedule(
            num_clients=num_clients,
            fraction=1.0,
            rounds=rounds,
            lr=0.05,
            lr_schedule="constant",
            seed=seed,
        )
        with (
            _patched(round_module, "local_train", timed("local_train")),
            _patched(round_module, "generator", timed("seeding")),
            _patched(server, "aggregate_updates", timed("aggregation")),
        ):
            _sync(device)
            start = time.perf_counter()
            history = run_rounds(
                global_model=global_model,
                client_model=client_model,
                method=method,
                images=images,
                client_indices=client_indices,
                schedule=schedule,
                settings=local_settings(batch_size),
                callbacks=[write_metrics, progress],
            )
            _sync(device)
            wall = time.perf_counter() - start
    overhead_s = wall - seconds["local_train"]
    known = sum(v for k, v in seconds.items() if k != "local_train")
    return {
        "overhead": overhead_s / wall,
        "clients": num_clients,
        "images_per_client": images_per_client,
        "dataset_images": int(images.shape[0]),
        "rounds": rounds,
        "round_s": wall / rounds,
        "local_train_s": seconds["local_train"],
        "overhead_s": overhead_s,
        "overhead_parts_s": {
            "load_global_weights": seconds["load_state"],
            "client_seeding": seconds["seeding"],
            "aggregation": seconds["aggregation"],
            "callbacks_metrics_logging": seconds["callbacks"],
            "other_loop": overhead_s - known,
        },
        "loss_last_round": history[-1]["loss"],
        **description,
    }


# ----------------------------------------------------------------------------- 3. DataLoader


def _reference_epoch(
    model: nn.Module,
    method: Method,
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    settings: LocalSettings,
) -> int:
    """One epoch of the same local training, fed by the DataLoader; returns the step count."""
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    steps = 0
    for view1, view2 in loader:
        if view1.shape[0] < 2:
            continue
        loss, _parts = method.local_loss(model, view1, view2, client_id=0, position=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return steps


def measure_dataloader(
    *,
    encoder: SmallEncoder,
    images: int,
    batch_size: int,
    workers: tuple[int, ...],
    reps: int,
    seed: int,
) -> dict[str, Any]:
    """The fast path vs per-image augmentation in a DataLoader, same model, loss and optimiser.

    Args:
        encoder: The small encoder.
        images: Images per epoch.
        batch_size: Mini-batch size.
        workers: DataLoader worker counts to measure (the best is the reference).
        reps: Alternating repetitions.
        seed: Seed of the images and models.

    Returns:
        ``speedup`` (reference epoch time / fast epoch time) and the times.
    """
    # Imported here so that ``python benchmarks/bench.py`` can first put the repository on the path.
    from benchmarks.reference import TwoViewDataset

    device = torch.device("cpu")
    data = synthetic_images(images, seed)
    indices = torch.arange(images)
    model, _, method, description = small_setup(encoder, 10, seed, device)
    settings = local_settings(batch_size)
    rng = torch.Generator().manual_seed(seed)
    dataset = TwoViewDataset(data, SSL_AUGMENT, seed)

    def fast() -> None:
        local_train(
            model,
            method,
            data,
            indices,
            settings=settings,
            generator=rng,
            client_id=0,
            position=0,
        )

    def reference(num_workers: int) -> Callable[[], None]:
        def run() -> None:
            loader = DataLoader(
                dataset,
                batch_size=batch_size,
                shuffle=True,
                num_workers=num_workers,
                generator=torch.Generator().manual_seed(seed),
                worker_init_fn=dataset.reseed if num_workers else None,
            )
            _reference_epoch(model, method, loader, settings)

        return run

    timings: dict[str, list[float]] = {"fast": []}
    timings.update({f"dataloader_workers_{w}": [] for w in workers})
    runs: list[tuple[str, Callable[[], None]]] = [("fast", fast)]
    runs += [(f"dataloader_workers_{w}", reference(w)) for w in workers]
    fast()  # warm-up
    for _ in range(reps):
        for name, fn in runs:
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    medians = {name: _median(values) for name, values in timings.items()}
    best_name = min((n for n in medians if n != "fast"), key=medians.__getitem__)
    return {
        "speedup": medians[best_name] / medians["fast"],
        "reference": best_name,
        "epoch_s": medians,
        "image_pairs_per_s": {name: images / s for name, s in medians.items()},
        "images": images,
        "batch_size": batch_size,
        "reps": reps,
        **description,
    }


# ----------------------------------------------------------------------------- 4. GPU


def bf16_peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak from :data:`BF16_PEAK_TFLOPS`, or None when unknown."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key in name:
            return peak
    return None


def flops_per_image_pair(model_factory: Callable[[], nn.Module], size: int = 32) -> float:
    """FLOPs of one two-view forward + backward per image pair, counted on the meta device.

    Counts the convolutions and matrix products (``torch.utils.flop_counter``), which is where
    nearly all of the work is; the loss terms (a few ``batch x batch`` products) are left out.
    """
    batch = 2
    with torch.device("meta"):
        model = model_factory()
        views = torch.empty(batch, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        bare_step(model, views, views)
    return float(counter.get_total_flops()) / batch


def protocol_image_pairs() -> int:
    """Two-view image passes of the paper's cross-silo protocol: 50k x 100 rounds x 5 epochs."""
    return PAPER_IMAGES * PAPER_ROUNDS * PAPER_EPOCHS


def _concurrent_clients(
    model: nn.Module,
    method: Method,
    images: torch.Tensor,
    *,
    clients: int,
    steps: int,
    batch_size: int,
    autocast: torch.dtype | None,
    device: torch.device,
) -> dict[str, Any]:
    """Several clients' steps interleaved on CUDA streams vs the same steps one client at a time.

    On a CPU the streams are stand-ins (no overlap), so the code path stays exercised.
    """
    models = [copy.deepcopy(model) for _ in range(clients)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    rngs = [torch.Generator(device=device).manual_seed(c) for c in range(clients)]
    batches = images.split(batch_size)
    amp: Callable[[], contextlib.AbstractContextManager[object]] = (
        (lambda: torch.autocast(device.type, dtype=autocast))
        if autocast
        else contextlib.nullcontext
    )

    def step(c: int, i: int) -> None:
        view1, view2 = two_views(batches[i % len(batches)], SSL_AUGMENT, generator=rngs[c])
        with amp():
            loss, _ = method.local_loss(models[c], view1, view2, client_id=c, position=c)
        optimizers[c].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[c].step()

    cuda = device.type == "cuda"
    streams = [torch.cuda.Stream(device) for _ in range(clients)] if cuda else []

    def on_stream(c: int) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(streams[c]) if cuda else contextlib.nullcontext()

    def sequential() -> None:
        for c in range(clients):
            for i in range(steps):
                step(c, i)

    def concurrent() -> None:
        for i in range(steps):
            for c in range(clients):
                with on_stream(c):
                    step(c, i)

    times: dict[str, float] = {}
    for name, fn in (("sequential", sequential), ("concurrent", concurrent)):
        fn()  # warm-up
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times[name] = time.perf_counter() - start
    pairs = clients * steps * batch_size
    return {
        "clients": clients,
        "mechanism": "CUDA streams" if cuda else "none (CPU stand-in, sequential)",
        "sequential_image_pairs_per_s": pairs / times["sequential"],
        "concurrent_image_pairs_per_s": pairs / times["concurrent"],
        "speedup": times["sequential"] / times["concurrent"],
    }


def measure_gpu(config: BenchConfig) -> dict[str, Any]:
    """ResNet-18 two-view SSD in bf16 + channels_last; a tiny CPU version without CUDA."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    # Without CUDA: a tiny ResNet-18 (width 4, batch 8) only keeps the code path working.
    width, batch, hidden = (64, 128, 2048) if cuda else (4, 8, 64)
    flops = flops_per_image_pair(
        lambda: build_model(encoder="resnet18", projector_hidden=2048, projector_out=None)
    )
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else None,
        "flops_per_image_pair": flops,
        "protocol_image_pairs": protocol_image_pairs(),
        "protocol_flops": flops * protocol_image_pairs(),
        "configuration": f"resnet18 width {width}, projector {8 * width}-{hidden}-{8 * width}, "
        f"batch {batch}, bf16 autocast, channels_last",
    }
    if not cuda:
        result["reason"] = (
            "no CUDA device on this machine: the GPU figures are null; a tiny CPU version "
            "(ResNet-18 width 4, batch 8, bf16 autocast, channels_last) ran to keep it working"
        )
    torch.manual_seed(config.seed)
    model = build_model(
        encoder="resnet18", width=width, projector_hidden=hidden, projector_out=None
    ).to(device)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    context = MethodContext(
        num_clients=10,
        feature_dim=model.feature_dim,
        embed_dim=model.embed_dim,
        seed=config.seed,
        device=device,
    )
    method = build_method("ssd", {}, context)
    steps = config.gpu_steps
    eager = measure_efficiency(
        model,
        method,
        batch_size=batch,
        batches=steps,
        reps=2 if cuda else 1,
        seed=config.seed,
        device=device,
        autocast=torch.bfloat16,
    )
    best = {"variant": "eager", **eager}
    if cuda and config.gpu_compile:
        try:
            compiled = cast(nn.Module, torch.compile(model))
            measured = measure_efficiency(
                compiled,
                method,
                batch_size=batch,
                batches=steps,
                reps=2,
                seed=config.seed,
                device=device,
                autocast=torch.bfloat16,
            )
            result["compile_image_pairs_per_s"] = measured["ssd_image_pairs_per_s"]
            if measured["ssd_image_pairs_per_s"] > best["ssd_image_pairs_per_s"]:
                best = {"variant": "torch.compile", **measured}
        except Exception as error:  # compile back-ends fail in many environment-specific ways
            result["compile_error"] = f"{type(error).__name__}: {error}"
    result["eager_image_pairs_per_s"] = eager["ssd_image_pairs_per_s"]
    concurrency = _concurrent_clients(
        model,
        method,
        synthetic_images(batch * 2, config.seed, device),
        clients=config.gpu_clients,
        steps=max(2, steps // 4),
        batch_size=batch,
        autocast=torch.bfloat16,
        device=device,
    )
    pairs_per_s = best["ssd_image_pairs_per_s"]
    peak = bf16_peak_tflops(result["device"] or "")
    if cuda:
        result.update(
            {
                "variant": best["variant"],
                "image_pairs_per_s": pairs_per_s,
                "train_efficiency": best["efficiency"],
                "bf16_peak_tflops": peak,
                "fraction_of_bf16_peak": flops * pairs_per_s / (peak * 1e12) if peak else None,
                "projected_protocol_minutes": protocol_image_pairs() / pairs_per_s / 60,
                "concurrent_clients": concurrency,
            }
        )
        if peak is None:
            result["reason"] = "card not in BF16_PEAK_TFLOPS: fraction of peak unknown"
    else:
        result.update(
            {
                "variant": None,
                "image_pairs_per_s": None,
                "train_efficiency": None,
                "bf16_peak_tflops": None,
                "fraction_of_bf16_peak": None,
                "projected_protocol_minutes": None,
                "concurrent_clients": None,
                "cpu_smoke": {
                    "image_pairs_per_s": pairs_per_s,
                    "efficiency": best["efficiency"],
                    "concurrent_clients": concurrency,
                },
            }
        )
    return result


# ----------------------------------------------------------------------------- 6. busy machine

# A process that keeps one core busy, as another user's job does.
HOG = "while True: pass"
# libgomp's spin count when no wait policy is set: PyTorch's threads before fedssd.openmp.
SPINNING = {"GOMP_SPINCOUNT": "300000"}


def smoke_train_seconds(overrides: tuple[str, ...], threads: int, env: dict[str, str]) -> float:
    """Run ``fedssd train --config smoke`` with ``overrides`` in a fresh process; its
    ``train_seconds``."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "fedssd.cli", "train", "--config", "smoke"]
        command += [arg for item in overrides for arg in ("--set", item)]
        command += ["--threads", str(threads), "--out", tmp, "--overwrite", "--quiet"]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads((Path(tmp) / "summary.json").read_text(encoding="utf-8"))
        return float(summary["train_seconds"])


@contextlib.contextmanager
def busy_process() -> Iterator[None]:
    """One process spinning on a core for the duration of the block."""
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def measure_busy_machine(
    *,
    reps: int,
    overrides: tuple[str, ...],
    threads: int,
    compare: bool,
    others: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The smoke run idle and beside one busy process, alternately, ``reps`` times.

    Args:
        reps: Pairs of runs per wait setting.
        overrides: The smoke run's ``--set`` overrides.
        threads: Its ``--threads``.
        compare: Also run the pairs with libgomp's spinning (:data:`SPINNING`).
        others: More wait settings to time the same way, each ``NAME=VALUE`` (for example
            ``GOMP_SPINCOUNT=1000``), replacing fedssd's.

    Returns:
        ``busy_machine`` (the median busy / idle ratio with fedssd's defaults) and the runs.
    """
    unset = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    settings = {"fedssd": {**os.environ}}
    if compare:
        settings["libgomp_spinning"] = {**unset, **SPINNING}
    for other in others:
        name, _, value = other.partition("=")
        settings[other] = {**unset, name: value}
    runs: dict[str, dict[str, list[float]]] = {name: {"idle": [], "busy": []} for name in settings}
    for _ in range(reps):
        for name, env in settings.items():
            runs[name]["idle"].append(smoke_train_seconds(overrides, threads, env))
            with busy_process():
                runs[name]["busy"].append(smoke_train_seconds(overrides, threads, env))
    result: dict[str, Any] = {
        "command": "fedssd train --config smoke " + " ".join(f"--set {o}" for o in overrides),
        "threads": threads,
        "busy_process": f"python -c {HOG!r}",
        "wait_settings": {k: os.environ[k] for k in USER_SETTINGS if k in os.environ},
        "reps": reps,
    }
    for name, times in runs.items():
        ratios = [b / i for i, b in zip(times["idle"], times["busy"], strict=True)]
        result[name] = {
            "idle_train_s": times["idle"],
            "busy_train_s": times["busy"],
            "idle_median_s": _median(times["idle"]),
            "busy_median_s": _median(times["busy"]),
            "busy_over_idle": _median(ratios),
        }
    result["busy_machine"] = result["fedssd"]["busy_over_idle"]
    if compare:
        # What the wait policy costs when nothing else runs (target: at most 5 %).
        result["idle_cost"] = (
            result["fedssd"]["idle_median_s"] / result["libgomp_spinning"]["idle_median_s"] - 1
        )
    return result


def report_busy_machine(busy: dict[str, Any], say: Callable[[str], None]) -> None:
    """Print the busy-machine figures, one line per wait setting and the verdict."""
    for name, part in busy.items():
        if isinstance(part, dict) and "busy_over_idle" in part:
            say(
                f"   {name:>22}: idle {part['idle_median_s']:.2f} s, busy "
                f"{part['busy_median_s']:.2f} s, ratio {part['busy_over_idle']:.2f}"
            )
    cost = busy.get("idle_cost")
    say(
        f"   busy_machine = {busy['busy_machine']:.2f} (target <= 1.5)"
        + ("" if cost is None else f" | idle cost of the wait policy {100 * cost:+.1f}% (<= 5%)")
    )


# ----------------------------------------------------------------------------- driver


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run(
    config: BenchConfig, *, allocator: str = "default", say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Measure every figure of issue 6 with ``config``'s sizes and return them as a dict.

    ``allocator`` says how the process's malloc is set up (:func:`fedssd.runtime.tune_malloc`).
    """
    device = torch.device("cpu")
    info = machine()
    info["allocator"] = allocator
    say(
        f"fedssd benchmark ({config.mode}) | torch {info['torch']} | {info['threads']} threads | "
        f"{info['cpu_count']} CPUs | {info['processor']} | CUDA: {info['cuda'] or 'none'} | "
        f"allocator: {allocator}"
    )
    results: dict[str, Any] = {
        "mode": config.mode,
        "machine": info,
        "config": dataclasses.asdict(config),
        "data": "synthetic uint8 3x32x32 images",
    }

    say("1. local-training efficiency (CPU, small encoder)")
    model, _, method, description = small_setup(config.encoder, 10, config.seed, device)
    eff = measure_efficiency(
        model,
        method,
        batch_size=config.batch_size,
        batches=config.efficiency_batches,
        reps=config.efficiency_reps,
        seed=config.seed,
        device=device,
    )
    eff.update(description)
    results["train_efficiency"] = eff["efficiency"]
    results["train_efficiency_detail"] = eff
    say(
        f"   train_efficiency = {eff['efficiency']:.3f}  (target >= 0.85) | per batch of "
        f"{config.batch_size}: bare fwd+bwd {eff['bare_ms_per_batch']:.1f} ms, SSD local step "
        f"{eff['ssd_ms_per_batch']:.1f} ms (augmentation {eff['augment_ms_per_batch']:.1f} ms)"
    )

    say("2. round overhead (real run_rounds, local_train timed)")
    rounds: dict[tuple[int, int], dict[str, Any]] = {}
    for key, (clients, per_client) in (
        ("round_overhead", config.overhead_clients),
        ("round_overhead_small_clients", config.small_clients),
    ):
        measured = measure_rounds(
            encoder=config.encoder,
            num_clients=clients,
            images_per_client=per_client,
            rounds=config.overhead_rounds,
            batch_size=config.batch_size,
            seed=config.seed,
            device=device,
        )
        rounds[(clients, clients * per_client)] = measured
        results[key] = measured["overhead"]
        results[f"{key}_detail"] = measured
        target = 0.03 if key == "round_overhead" else 0.10
        parts = ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in measured["overhead_parts_s"].items())
        say(
            f"   {key} = {100 * measured['overhead']:.2f}% (target <= {100 * target:.0f}%) | "
            f"K={clients} x {per_client} images, round {measured['round_s']:.2f} s | {parts}"
        )

    say("3. against per-image augmentation in a DataLoader (the released code's feeding)")
    loader = measure_dataloader(
        encoder=config.encoder,
        images=config.dataloader_images,
        batch_size=config.batch_size,
        workers=config.dataloader_workers,
        reps=config.dataloader_reps,
        seed=config.seed,
    )
    results["speedup_vs_dataloader"] = loader["speedup"]
    results["speedup_vs_dataloader_detail"] = loader
    rates = ", ".join(f"{k} {v:.0f}" for k, v in loader["image_pairs_per_s"].items())
    say(
        f"   speedup_vs_dataloader = {loader['speedup']:.2f}x vs {loader['reference']} | "
        f"image pairs/s: {rates}"
    )

    say("4. GPU (ResNet-18, bf16, channels_last)")
    gpu = measure_gpu(config)
    results["gpu"] = gpu
    say(
        f"   FLOPs per image pair (ResNet-18, two views, fwd+bwd): "
        f"{gpu['flops_per_image_pair'] / 1e9:.2f} G; the protocol's "
        f"{gpu['protocol_image_pairs']:.2e} pairs: {gpu['protocol_flops']:.2e} FLOPs"
    )
    if gpu["image_pairs_per_s"] is None:
        say(f"   {gpu['reason']}")
    else:
        frac = gpu["fraction_of_bf16_peak"]
        say(
            f"   {gpu['device']}: {gpu['image_pairs_per_s']:.0f} image pairs/s ({gpu['variant']}), "
            f"efficiency {gpu['train_efficiency']:.3f}, "
            f"{'n/a' if frac is None else f'{100 * frac:.1f}%'} of bf16 peak, projected protocol "
            f"{gpu['projected_protocol_minutes']:.1f} min; concurrent clients x"
            f"{gpu['concurrent_clients']['speedup']:.2f}"
        )

    say("5. scaling of the round time (one round, every client trains)")
    table = []
    for dataset_images in config.scaling_images:
        for clients in config.scaling_clients:
            cached = rounds.get((clients, dataset_images))
            if cached is not None:
                measured = cached
            else:
                measured = measure_rounds(
                    encoder=config.encoder,
                    num_clients=clients,
                    images_per_client=dataset_images // clients,
                    rounds=1,
                    batch_size=config.batch_size,
                    seed=config.seed,
                    device=device,
                )
            row = {
                "clients": clients,
                "dataset_images": measured["dataset_images"],
                "images_per_client": measured["images_per_client"],
                "round_s": measured["round_s"],
                "overhead": measured["overhead"],
                "method": measured["method"],
            }
            table.append(row)
            say(
                f"   K={clients:>3} | {row['dataset_images']:>6} images "
                f"({row['images_per_client']:>5}/client) | round {row['round_s']:7.2f} s | "
                f"overhead {100 * row['overhead']:5.2f}%"
            )
    results["scaling"] = table

    say("6. a busy machine (the smoke run idle and beside one busy process)")
    if config.busy_reps:
        busy = measure_busy_machine(
            reps=config.busy_reps,
            overrides=config.busy_overrides,
            threads=torch.get_num_threads(),
            compare=config.busy_compare,
        )
        results["busy_machine"] = busy["busy_machine"]
        results["busy_machine_detail"] = busy
        report_busy_machine(busy, say)
    else:
        results["busy_machine"] = None
        results["busy_machine_detail"] = None
        say("   not measured (busy_reps = 0)")
    results["targets"] = {
        "train_efficiency": {
            "value": results["train_efficiency"],
            "target": ">= 0.85",
            "met": results["train_efficiency"] >= 0.85,
        },
        "round_overhead": {
            "value": results["round_overhead"],
            "target": "<= 0.03",
            "met": results["round_overhead"] <= 0.03,
        },
        "round_overhead_small_clients": {
            "value": results["round_overhead_small_clients"],
            "target": "<= 0.10",
            "met": results["round_overhead_small_clients"] <= 0.10,
        },
        "busy_machine": {
            "value": results["busy_machine"],
            "target": "<= 1.5",
            "met": results["busy_machine"] is not None and results["busy_machine"] <= 1.5,
        },
    }
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.bench [--quick] [--threads N] [--out PATH]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (under 2 minutes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="where to write the JSON (runs/bench/latest.json)"
    )
    parser.add_argument(
        "--update-reference",
        action="store_true",
        help=f"also replace the committed record {REFERENCE.relative_to(REFERENCE.parents[2])}",
    )
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's malloc settings as they are (training tunes them: fedssd.runtime)",
    )
    parser.add_argument(
        "--busy-only",
        action="store_true",
        help="measure only the busy_machine figure (to runs/bench/busy.json unless --out)",
    )
    parser.add_argument(
        "--busy-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --busy-only: also time this wait setting, e.g. GOMP_SPINCOUNT=1000 (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.busy_only:
        config = QUICK if args.quick else FULL
        busy = measure_busy_machine(
            reps=config.busy_reps,
            overrides=config.busy_overrides,
            threads=torch.get_num_threads(),
            compare=True,
            others=tuple(args.busy_env),
        )
        report_busy_machine(busy, print)
        out = RESULTS.with_name("busy.json") if args.out == RESULTS else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(busy, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
        return 0
    # Training (fedssd.api, the Flower ClientApp) tunes the allocator, so the benchmark does too.
    allocator = "default" if args.default_allocator or not tune_malloc() else DESCRIPTION
    started = time.perf_counter()
    results = run(QUICK if args.quick else FULL, allocator=allocator)
    results["bench_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out} ({results['bench_seconds']:.0f} s)")
    if args.update_reference:
        REFERENCE.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"updated the committed record {REFERENCE}")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        # Run as a file (python benchmarks/bench.py): make the repository root importable.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
