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
It changes only when threads wait, never how the work is divided, so results stay bit for bit
the same for a given thread count. The runtimes read their settings once, when they load, so
they must be in the environment before ``import torch``: :func:`apply_defaults` runs when the
``fedssd`` package is imported (the CLI, sweep workers, Flower's ClientApp and ServerApp all
import it before PyTorch), and child processes inherit it. A program that imports torch before
fedssd keeps its runtime's defaults in its own process.

Whoever sets one of the wait settings below (``OMP_WAIT_POLICY``, libgomp's
``GOMP_SPINCOUNT``, Intel and LLVM OpenMP's ``KMP_BLOCKTIME``) keeps their choice: fedssd then
sets nothing.
"""

from __future__ import annotations

from collections.abc import MutableMapping

DEFAULTS: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}
"""What fedssd sets when the user set none of :data:`USER_SETTINGS`."""

USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
"""The OpenMP environment variables that choose how threads wait."""


def apply_defaults(environ: MutableMapping[str, str]) -> dict[str, str]:
    """Put :data:`DEFAULTS` into ``environ`` unless one of :data:`USER_SETTINGS` is there.

    Returns:
        What was set (empty when the user's own setting was kept).
    """
    if any(environ.get(name, "").strip() for name in USER_SETTINGS):
        return {}
    environ.update(DEFAULTS)
    return dict(DEFAULTS)
