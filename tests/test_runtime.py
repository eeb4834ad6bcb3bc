"""The allocator settings training applies (fedssd.runtime) and the OpenMP wait policy importing
fedssd sets (fedssd.openmp)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fedssd import openmp, runtime

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


# ----------------------------------------------------------------------------- OpenMP waiting

# Imports fedssd (which sets the wait policy) before torch, runs one parallel operation on two
# threads, then sleeps: the CPU time the process burns while it sleeps is what its OpenMP
# threads spent spinning.
SPIN_PROBE = """
import resource, time
import fedssd
import torch

torch.set_num_threads(2)
x = torch.randn(1 << 20)

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

spent = 0.0
for _ in range(5):
    (x * 2).sum()
    before = cpu()
    time.sleep(0.2)
    spent += cpu() - before
print(spent)
"""


def spin_seconds(env: dict[str, str]) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in openmp.USER_SETTINGS}
    done = subprocess.run(
        [sys.executable, "-c", SPIN_PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return float(done.stdout)


def test_the_wait_policy_is_set_unless_the_user_chose_one() -> None:
    environ: dict[str, str] = {}
    assert openmp.apply_defaults(environ) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    for name, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")):
        chosen = {name: value}
        assert openmp.apply_defaults(chosen) == {} and chosen == {name: value}


@pytest.mark.skipif(not GLIBC, reason="checked with the Linux wheels' GNU OpenMP")
def test_threads_do_not_spin_after_a_parallel_operation() -> None:
    """With fedssd's default the idle OpenMP thread sleeps at once; with libgomp's own default
    (300,000 spins) it burns milliseconds of CPU after every parallel operation, which a busy
    machine's other processes needed."""
    assert spin_seconds({}) < 0.005  # five waits; about 0.1 ms each on the development machine


@pytest.mark.slow
def test_the_wait_policy_leaves_results_bit_identical(tmp_path: Path) -> None:
    """The same run on 2 threads with fedssd's wait policy and with libgomp's default."""
    smoke = Path(__file__).resolve().parents[1] / "src" / "fedssd" / "configs" / "smoke.toml"
    tiny = ["data.train_subset=200", "data.test_subset=100", "model.width=4"]
    tiny += ["model.projector_hidden=16", "federation.rounds=1", "federation.batch_size=32"]
    tiny += ["evaluation.every=0", "evaluation.linear_epochs=0", "evaluation.metrics_samples=100"]
    tiny += ["evaluation.metrics_per_client=20"]
    models = []
    for name, env in (("passive", {}), ("spinning", {"GOMP_SPINCOUNT": "300000"})):
        clean = {k: v for k, v in os.environ.items() if k not in openmp.USER_SETTINGS}
        command = [sys.executable, "-m", "fedssd.cli", "train", "--config", str(smoke)]
        command += [arg for item in tiny for arg in ("--set", item)]
        command += ["--threads", "2", "--out", str(tmp_path / name), "--quiet"]
        subprocess.run(command, env={**clean, **env}, check=True, timeout=600)
        models.append((tmp_path / name / "model.safetensors").read_bytes())
    assert models[0] == models[1]
