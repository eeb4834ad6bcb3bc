"""Where the time of one SSD local step goes, beside the bare forward + backward it is
compared with.

Run ``python -m benchmarks.step_profile [--threads N] [--reps R]``. The step is the one
``train_efficiency`` times (:mod:`benchmarks.bench`): the small encoder, SSD with every term, a
batch of 128 synthetic CIFAR-sized images. Its parts, in the order
:func:`fedssd.federation.client.local_train` runs them, are timed one by one: drawing the batch,
the two-view augmentation (and within it drawing the parameters, crop + resize + flip, colour
jitter, grayscale), the SSD loss's forward (the model on both views, then the loss terms),
zeroing the gradients, backward, and the optimizer step; beside them the bare step.

Each part is timed twice: wall seconds, and the CPU seconds of the whole process
(``resource.getrusage``), which other processes on the machine disturb much less than wall time
(with one thread, CPU seconds are the part's own work; with more, they add up every thread's,
spinning included). Medians over the repetitions, milliseconds per batch. With ``--ops`` it also
prints torch.profiler's table of the operators by self CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import SmallEncoder, bare_step, small_setup, synthetic_images
from fedssd.data import augment as aug
from fedssd.data.augment import SSL_AUGMENT
from fedssd.federation.client import fused_sgd
from fedssd.methods.ssd import SSD
from fedssd.methods.views import forward_views, full_precision
from fedssd.runtime import tune_malloc


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timer:
    """Wall and CPU seconds per named part, one list entry per repetition."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}
        self._open: dict[str, tuple[float, float]] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), _cpu()
        try:
            yield
        finally:
            self.wall.setdefault(name, []).append(time.perf_counter() - wall)
            self.cpu.setdefault(name, []).append(_cpu() - cpu)

    def medians_ms(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "wall_ms": 1e3 * statistics.median(self.wall[name]),
                "cpu_ms": 1e3 * statistics.median(self.cpu[name]),
            }
            for name in self.wall
        }


def profile(*, reps: int, batch_size: int, seed: int = 0) -> dict[str, Any]:
    """Time each part of the SSD step and the bare step ``reps`` times after a warm-up."""
    device = torch.device("cpu")
    model, _, method, _ = small_setup(SmallEncoder(), 10, seed, device)
    assert isinstance(method, SSD)
    model.train()
    images = synthetic_images(batch_size * 4, seed, device)
    indices = torch.arange(images.shape[0])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=0.05, momentum=0.9, weight_decay=5e-4, fused=fused_sgd(params)
    )
    generator = torch.Generator().manual_seed(seed)
    timer = Timer()
    parts_of_augment: dict[str, Callable[..., Any]] = {
        "augment/params": aug.sample_params,
        "augment/crop_resize_flip": aug.crop_resize_flip,
        "augment/color_jitter": aug.color_jitter,
        "augment/grayscale": aug.grayscale,
    }

    def step(record: bool) -> None:
        t = timer if record else Timer()
        with t.part("ssd step"):
            with t.part("draw batch"):
                order = indices[torch.randperm(indices.numel(), generator=generator)]
                batch = images[order[:batch_size]]
            with t.part("augment"):
                view1, view2 = aug.two_views(batch, SSL_AUGMENT, generator=generator)
            with t.part("forward: model on both views"):
                out = forward_views(model, view1, view2)
            with t.part("forward: loss terms"), full_precision(device):
                # SSD's local_loss is forward_views then these terms (timed apart here).
                loss, _parts = method._loss(out, client_id=0, position=0)
            with t.part("zero_grad"):
                optimizer.zero_grad(set_to_none=True)
            with t.part("backward"):
                loss.backward()
            with t.part("optimizer step"):
                optimizer.step()
        view1, view2 = aug.two_views(batch, SSL_AUGMENT, generator=generator)
        with t.part("bare step (fwd+bwd)"):
            bare_step(model, view1, view2)

    with _timed_functions(aug, parts_of_augment, timer):
        for _ in range(3):
            step(record=False)
        timer.wall.clear()
        timer.cpu.clear()
        for _ in range(reps):
            step(record=True)
    return timer.medians_ms()


@contextlib.contextmanager
def _timed_functions(
    module: Any, functions: dict[str, Callable[..., Any]], timer: Timer
) -> Iterator[None]:
    """Wrap ``module``'s functions so that each call is timed under its name."""
    originals = {}
    for name, function in functions.items():
        attribute = function.__name__
        originals[attribute] = function

        def wrapped(*args: Any, _f: Any = function, _n: str = name, **kwargs: Any) -> Any:
            with timer.part(_n):
                return _f(*args, **kwargs)

        setattr(module, attribute, wrapped)
    try:
        yield
    finally:
        for attribute, function in originals.items():
            setattr(module, attribute, function)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.step_profile [--threads N] [--reps R] [--ops]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ops", action="store_true", help="also torch.profiler's operator table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()
    figures = profile(reps=args.reps, batch_size=args.batch_size)
    ssd = figures["ssd step"]
    bare = figures["bare step (fwd+bwd)"]
    print(
        f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.reps} reps; "
        f"median ms per batch (share of the SSD step)"
    )
    print(f"{'part':<32}{'wall ms':>10}{'':>8}{'CPU ms':>10}{'':>8}")
    for name, value in figures.items():
        print(
            f"{name:<32}{value['wall_ms']:>10.2f}{value['wall_ms'] / ssd['wall_ms']:>8.1%}"
            f"{value['cpu_ms']:>10.2f}{value['cpu_ms'] / ssd['cpu_ms']:>8.1%}"
        )
    print(
        f"bare / SSD step: wall {bare['wall_ms'] / ssd['wall_ms']:.3f}, "
        f"CPU {bare['cpu_ms'] / ssd['cpu_ms']:.3f}"
    )
    if args.ops:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profile(reps=3, batch_size=args.batch_size)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
