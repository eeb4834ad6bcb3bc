"""The allocator settings training applies (fedssd.runtime)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fedssd import runtime

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Augments a batch of 128 CIFAR-sized images 20 times after a warm-up and prints whether
# tune_malloc() reported success and the minor page faults per call: each one is a page of
# memory handed back to the kernel and taken again.
PROBE = """
import resource
import torch
from fedssd.data.augment import SSL_AUGMENT, two_views
from fedssd.runtime import tune_malloc

tuned = tune_malloc()
images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
gen = torch.Generator().manual_seed(0)
for _ in range(5):
    two_views(images, SSL_AUGMENT, generator=gen)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    two_views(images, SSL_AUGMENT, generator=gen)
print(int(tuned), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def probe(switch: str) -> tuple[bool, float]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, runtime.ENV_SWITCH: switch},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    tuned, faults = done.stdout.split()
    return tuned == "1", float(faults)


@pytest.mark.slow
@pytest.mark.skipif(not GLIBC, reason="mallopt exists only in glibc")
def test_tuned_malloc_stops_page_faults_in_the_augmentation() -> None:
    tuned, tuned_faults = probe("1")
    untouched, default_faults = probe("0")
    assert tuned and not untouched
    # glibc's defaults give back and fault in again about 3,500 pages (14 MiB) per call here.
    assert default_faults > 500
    assert tuned_faults < default_faults / 10


def test_tune_malloc_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.ENV_SWITCH, "0")
    assert runtime.tune_malloc() is False
