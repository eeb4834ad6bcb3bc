"""How PyTorch's CPU threads wait, set when fedssd is imported, before PyTorch loads.

PyTorch's CPU build runs its parallel operations on OpenMP threads (GNU libgomp in the Linux
wheels, LLVM or Intel OpenMP elsewhere). Between two parallel operations, and while one thread
waits for the others to finish theirs, an OpenMP thread by default spins on its core for a while
(libgomp: 300,000 iterations, milliseconds) before it sleeps. On an idle machine that saves a
wake-up; on a machine where another process holds a core it is ruinous: a thread spins on the
core the thread it waits for needs, through operation after operation. fedssd's training does
many small operations, so it waits often, and one busy process beside it on a 2-core machine made
the smoke run several times slower with libgomp's default (README, "Threads").

``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep at once (every OpenMP runtime reads it).
That is what a busy machine needs, but on an idle one every wake-up costs: the smoke run took 37 %
longer with PASSIVE than with libgomp's spinning on an idle 2-core machine (docs/benchmarks.md, "A
busy machine"), and no spin count in between was good both ways. So fedssd looks before it
chooses: :func:`apply_defaults` measures, over 0.1 s, how much of the CPUs this process may run on
other processes keep busy (``/proc/stat``), and sets PASSIVE when they keep half a core or more
busy; on an idle machine it leaves the runtime's own spinning. Where it cannot measure (not
Linux), it sets PASSIVE, the choice that is never ruinous.

The wait policy changes only when threads wait, never how the work is divided, so results stay
bit for bit the same for a given thread count whichever is chosen. The runtimes read their
settings once, when they load, so they must be in the environment before ``import torch``:
:func:`apply_defaults` runs when the ``fedssd`` package is imported (the CLI, sweep workers,
Flower's ClientApp and ServerApp all import it before PyTorch), and child processes inherit what
it set. The choice is made when the process starts: a load that begins later is not seen (a
Flower node starts a fresh ClientApp, and chooses again, for every message). A program that
imports torch before fedssd keeps its runtime's defaults in its own process.

Whoever sets one of the wait settings below (``OMP_WAIT_POLICY``, libgomp's
``GOMP_SPINCOUNT``, Intel and LLVM OpenMP's ``KMP_BLOCKTIME``) keeps their choice: fedssd then
measures and sets nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence

DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
"""What fedssd sets when the user set none of :data:`USER_SETTINGS` and the machine is busy."""

USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""The OpenMP environment variables that choose how threads wait."""

BUSY_CORES = 0.5
"""Cores' worth of other processes' work from which the machine counts as busy."""

WINDOW = 0.1
"""Seconds over which :func:`machine_busy` measures."""


def parse_stat(text: str, cpus: Sequence[int]) -> tuple[int, int]:
    """The total and the idle clock ticks (idle + iowait) of ``cpus`` in ``/proc/stat``'s text.

    Raises:
        ValueError: A CPU of ``cpus`` has no line.
    """
    wanted = {f"cpu{cpu}" for cpu in cpus}
    total = idle = 0
    found = 0
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            ticks = [int(f) for f in fields[1:8]]  # user nice system idle iowait irq softirq
            total += sum(ticks)
            idle += ticks[3] + ticks[4]
            found += 1
    if found != len(wanted):
        raise ValueError("/proc/stat lacks a CPU this process may run on")
    return total, idle


def busy_cores(before: tuple[int, int], after: tuple[int, int], cpus: int) -> float:
    """How many of ``cpus`` cores were busy between two :func:`parse_stat` readings."""
    total = after[0] - before[0]
    if total <= 0:
        return 0.0
    return cpus * (total - (after[1] - before[1])) / total


def machine_busy(window: float = WINDOW) -> bool | None:
    """Whether other processes keep :data:`BUSY_CORES` or more of this process's CPUs busy, over
    ``window`` seconds during which this process sleeps; None where it cannot tell."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        with open("/proc/stat", encoding="ascii") as stat:
            before = parse_stat(stat.read(), cpus)
        time.sleep(window)
        with open("/proc/stat", encoding="ascii") as stat:
            after = parse_stat(stat.read(), cpus)
    except (AttributeError, OSError, ValueError):
        return None
    return busy_cores(before, after, len(cpus)) >= BUSY_CORES


def apply_defaults(
    environ: MutableMapping[str, str], busy: Callable[[], bool | None] = machine_busy
) -> dict[str, str]:
    """Put :data:`DEFAULTS` into ``environ`` when the machine is busy (or ``busy`` cannot tell),
    unless one of :data:`USER_SETTINGS` is there.

    Returns:
        What was set (empty when the user's own setting was kept or the machine is idle).
    """
    if any(environ.get(name, "").strip() for name in USER_SETTINGS):
        return {}
    if busy() is False:
        return {}
    environ.update(DEFAULTS)
    return dict(DEFAULTS)


def wait_setting(environ: Mapping[str, str]) -> str:
    """How this process's OpenMP threads wait, for the run's log: the setting in ``environ``
    (fedssd's or the user's), or the runtime's default (spinning, in GNU OpenMP)."""
    for name in USER_SETTINGS:
        value = environ.get(name, "").strip()
        if value:
            return f"{name}={value}"
    return "OpenMP's default wait"
