"""Seconds of local training per round for one site, by encoder and image size.

Run ``python -m benchmarks.encoder_sizes`` (one command, prints the table; ``--out FILE`` also
writes the figures as JSON). For every encoder and image side it times fedssd's real client
training (:func:`fedssd.federation.client.local_train`: the batched two-view augmentation, SSD's
loss with every term, the SGD step) on synthetic uint8 images of that side, with the model
sizes a config gets when it names only the encoder (default width, projector 2048 wide with the
feature width as its output) and SSD for ``--clients`` sites.

A round of a site with ``--images`` images and ``--epochs`` local epochs is ``epochs x images /
batch`` steps of ``--batch`` images (the last, smaller batch counted pro rata). Where a step of
that batch takes no longer than ``--step-seconds``, it is timed as it is (``--steps`` steps after
an untimed one). Where it would take longer (large images, large encoders), steps of 4 images
and steps of a smaller batch are timed and the step of ``--batch`` images is extrapolated from
the line through them: a fixed part per step (optimizer, the loss on the batch's embeddings)
and a part per image. Weight transfer, aggregation and evaluation are not part of the figure.

Both wall time (``time.perf_counter``) and the process's CPU time (``time.process_time``, all
threads) are printed. On a machine others are using, wall time grows with their load while CPU
time mostly does not: with ``--threads 1`` the CPU time is what one quiet core would take.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedssd.data.augment import SSL_AUGMENT
from fedssd.federation.client import LocalSettings, local_train
from fedssd.methods import MethodContext, build_method
from fedssd.models import build_model
from fedssd.runtime import tune_malloc

ENCODERS = (
    "small_cnn",
    "resnet18",
    "resnet18_imagenet",
    "resnet34_imagenet",
    "resnet50_imagenet",
)
SIZES = (32, 64, 128, 224)


def cpu_model() -> str:
    """The CPU's model name, family and model number (Linux), else what :mod:`platform` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return (
        f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')}, "
        f"model {fields.get('model', '?')})"
    )


def step_time(few: float, many: float, *, timed: int, batch: int) -> float:
    """Seconds of a step of ``batch`` images from a step of 4 (``few``) and one of ``timed``
    (``many``): ``many`` itself when ``timed == batch``, else the line through both, a fixed
    part per step (optimizer, the loss on the batch's embeddings) plus a part per image."""
    if timed == batch:
        return many
    per_image = max(0.0, (many - few) / (timed - 4))
    return max(0.0, few - 4 * per_image) + batch * per_image


def time_images(
    encoder: str,
    size: int,
    *,
    batch: int,
    clients: int,
    step_seconds: float,
    steps: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Time SSD local training on ``size`` x ``size`` images with ``encoder``.

    Returns:
        The batch timed and the wall and CPU seconds of one step of ``batch`` images: measured
        when the batch timed is ``batch``, else fitted as a fixed part plus a part per image
        through ``steps`` steps of 4 images and ``steps`` of the batch timed.
    """
    torch.manual_seed(seed)
    model = build_model(encoder=encoder, projector_out=None)
    context = MethodContext(
        num_clients=clients,
        feature_dim=model.feature_dim,
        embed_dim=model.embed_dim,
        seed=seed,
        device=torch.device("cpu"),
    )
    method = build_method("ssd", {}, context)
    generator = torch.Generator().manual_seed(seed)

    def train(images: int, batch_size: int) -> tuple[float, float]:
        data = torch.randint(
            0, 256, (images, 3, size, size), dtype=torch.uint8, generator=generator
        )
        settings = LocalSettings(
            epochs=1,
            batch_size=batch_size,
            lr=0.05,
            momentum=0.9,
            weight_decay=5e-4,
            augment=dataclasses.replace(SSL_AUGMENT, size=size),
        )
        wall, cpu = time.perf_counter(), time.process_time()
        local_train(
            model,
            method,
            data,
            torch.arange(images),
            settings=settings,
            generator=generator,
            client_id=0,
            position=0,
        )
        return time.perf_counter() - wall, time.process_time() - cpu

    # The first calls of a shape set its kernels up: each batch size is trained once untimed.
    # The batch timed is chosen on CPU time, which other processes' load does not stretch.
    train(4, 4)
    small = train(4 * steps, 4)
    timed_batch = min(batch, max(8, int(step_seconds * 4 * steps / small[1])))
    train(timed_batch, timed_batch)
    large = train(timed_batch * steps, timed_batch)
    per_step = {
        clock: step_time(few / steps, many / steps, timed=timed_batch, batch=batch)
        for clock, (few, many) in (("wall", (small[0], large[0])), ("cpu", (small[1], large[1])))
    }
    return {
        "batch_timed": timed_batch,
        "wall_s_per_step": per_step["wall"],
        "cpu_s_per_step": per_step["cpu"],
    }


def measure(
    encoders: Sequence[str],
    sizes: Sequence[int],
    *,
    images: int,
    epochs: int,
    batch: int,
    clients: int,
    step_seconds: float,
    steps: int,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every (encoder, size) of the grid, with the round's seconds extrapolated."""
    rows = []
    for encoder in encoders:
        for size in sizes:
            figures = time_images(
                encoder,
                size,
                batch=batch,
                clients=clients,
                step_seconds=step_seconds,
                steps=steps,
            )
            steps_per_round = epochs * images / batch
            row = {
                "encoder": encoder,
                "size": size,
                **figures,
                "wall_s_per_round": figures["wall_s_per_step"] * steps_per_round,
                "cpu_s_per_round": figures["cpu_s_per_step"] * steps_per_round,
            }
            say(
                f"{encoder} {size}px: batch {row['batch_timed']} x {steps}, "
                f"{row['cpu_s_per_round']:.1f} CPU s / {row['wall_s_per_round']:.1f} wall s "
                "per round"
            )
            rows.append(row)
    return rows


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


def table(rows: Sequence[dict[str, Any]], *, batch: int) -> str:
    """The Markdown table: one row per encoder, one column pair per size."""
    sizes = sorted({row["size"] for row in rows})
    encoders = list(dict.fromkeys(row["encoder"] for row in rows))
    by = {(row["encoder"], row["size"]): row for row in rows}
    head = "| encoder | " + " | ".join(f"{s} px: CPU / wall per round" for s in sizes) + " |"
    lines = [head, "|---|" + "---|" * len(sizes)]
    for encoder in encoders:
        cells = []
        for size in sizes:
            row = by.get((encoder, size))
            if row is None:
                cells.append("")
                continue
            step = f" ({row['cpu_s_per_step']:.2f} s per step of {batch})"
            cells.append(
                f"{_seconds(row['cpu_s_per_round'])} / {_seconds(row['wall_s_per_round'])}{step}"
            )
        lines.append(f"| `{encoder}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the grid and print the table (and write JSON with ``--out``)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.encoder_sizes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (default 1)")
    parser.add_argument("--images", type=int, default=800, help="images of the site")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch", type=int, default=64, help="local batch size")
    parser.add_argument("--clients", type=int, default=3, help="sites (SSD's K)")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=4.0,
        help="time large images in batches of at most about this many seconds (default 4)",
    )
    parser.add_argument("--steps", type=int, default=2, help="timed steps (default 2)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows = measure(
        args.encoders,
        args.sizes,
        images=args.images,
        epochs=args.epochs,
        batch=args.batch,
        clients=args.clients,
        step_seconds=args.step_seconds,
        steps=args.steps,
    )
    load_after = os.getloadavg()
    machine = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average_1min": [load_before[0], load_after[0]],
        "seconds": time.perf_counter() - started,
    }
    print()
    print(
        f"Local training per round for a site of {args.images} images, {args.epochs} epoch(s), "
        f"batch {args.batch}, SSD with {args.clients} sites; {machine['cpu']}, "
        f"{args.threads} thread(s), torch {machine['torch']}, 1-minute load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after."
    )
    print()
    print(table(rows, batch=args.batch))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        payload = {"machine": machine, "settings": settings, "rows": rows}
        args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
