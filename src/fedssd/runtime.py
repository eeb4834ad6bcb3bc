"""Process-wide settings that make CPU training faster, applied by the job entry points.

Training allocates and frees the same large tensors (activations, augmented views, gradients)
every step. With glibc's default settings, blocks of more than 128 KiB are mapped from the
kernel and, once freed, handed back to it (directly, or by trimming the top of the heap), so
the next step's tensors of the same size start with page faults on fresh zeroed pages: about
3,500 per two-view augmentation of 128 CIFAR-sized images, against 30 with the settings below
(``tests/test_runtime.py``). On the 2-core CPU this project is tested on, that is about a third
of the augmentation's time, and it slows the model's own forward and backward as well
(``docs/benchmarks.md``). :func:`tune_malloc` keeps freed blocks of up to 32 MiB in the process
instead, as allocators such as jemalloc do by default; the process then holds on to its peak
heap after tensors are freed.

Set the environment variable ``FEDSSD_TUNE_MALLOC=0`` to leave the allocator as it is.

:func:`cpu_threads` applies the config's ``threads`` (PyTorch's intra-op threads) for the length
of a run and :func:`busy_machine_hint` says when more threads than free cores are likely. How the
threads wait is set before PyTorch loads, by :mod:`fedssd.openmp`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from collections.abc import Iterator

import torch

from fedssd.errors import ConfigError

ENV_SWITCH = "FEDSSD_TUNE_MALLOC"
# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks up to this size come from the heap (glibc's largest allowed value on 64-bit)."""
TRIM_THRESHOLD = 1024 * 1024 * 1024
"""Free memory at the top of the heap is given back to the kernel only beyond this size."""
DESCRIPTION = (
    f"glibc malloc, mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
    f"trim threshold {TRIM_THRESHOLD >> 30} GiB"
)


def tune_malloc() -> bool:
    """Keep freed blocks of up to 32 MiB for reuse instead of returning them to the kernel.

    Does nothing, and returns False, where the C library is not glibc or the environment variable
    ``FEDSSD_TUNE_MALLOC`` is ``0``. Calling it again is harmless.

    Returns:
        Whether glibc accepted both settings.
    """
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting either one turns off glibc's dynamic adjustment of both.
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (0: leave PyTorch's setting), then restore
    the previous count, so that a caller's own setting survives :func:`fedssd.train`.

    The inter-op pool is left alone: PyTorch refuses to resize it once any parallel work has run,
    and training does not use it.

    Yields:
        The number of threads in effect.
    """
    previous = torch.get_num_threads()
    if threads > 0 and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def busy_machine_hint(threads: int) -> str | None:
    """A hint to use fewer threads when the 1-minute load average already fills every core.

    More busy threads than cores make PyTorch's threads wait for each other. Threads that sleep
    while they wait (:mod:`fedssd.openmp`) cost far less than spinning ones, but a thread that
    has no core still holds up the others (README, "Threads"). The load is only advice: the thread
    count, which results depend on, never follows it.

    Args:
        threads: The threads the run will use.

    Returns:
        One line of advice, or None when the machine does not look busy (or cannot tell).
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
    if threads <= 1 or load < cores:
        return None
    return (
        f"note: the load average ({load:.1f}) already fills the {cores} CPU cores; if other jobs "
        f"share them, --threads 1 (config key threads) may be faster than {threads} threads."
    )


def select_device(name: str) -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was asked for but no CUDA device is available; use 'auto'."
        )
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for ``auto``; full precision on the CPU; float16 (CUDA only).

    Raises:
        ConfigError: ``fp16`` on a device other than CUDA.
    """
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                f"precision = 'fp16' needs a CUDA device, not {device.type}; use 'bf16' or "
                "'fp32' there."
            )
        return torch.float16
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
