"""The allocator settings training applies (fedssd.runtime) and the OpenMP wait policy importing
fedssd sets (fedssd.openmp)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
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


def test_the_run_log_names_the_wait_setting() -> None:
    assert openmp.wait_setting({"OMP_WAIT_POLICY": "PASSIVE"}) == "OMP_WAIT_POLICY=PASSIVE"
    assert openmp.wait_setting({"GOMP_SPINCOUNT": " 1000 "}) == "GOMP_SPINCOUNT=1000"
    assert openmp.wait_setting({"OMP_WAIT_POLICY": ""}) == "OpenMP's default wait"


def _refuse() -> bool:
    raise AssertionError("measured the machine although the user chose a wait setting")


def test_the_wait_policy_follows_the_machine_unless_the_user_chose_one() -> None:
    busy: dict[str, str] = {}
    assert openmp.apply_defaults(busy, busy=lambda: True) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert busy == {"OMP_WAIT_POLICY": "PASSIVE"}
    idle: dict[str, str] = {}
    assert openmp.apply_defaults(idle, busy=lambda: False) == {} and idle == {}
    unknown: dict[str, str] = {}  # not Linux: PASSIVE, never ruinous
    assert openmp.apply_defaults(unknown, busy=lambda: None) == {"OMP_WAIT_POLICY": "PASSIVE"}
    for name, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "300000")):
        chosen = {name: value}
        assert openmp.apply_defaults(chosen, busy=_refuse) == {} and chosen == {name: value}


STAT = """cpu  {all}
cpu0 {a} 0 {b} {c} {d} 0 0 0 0 0
cpu1 {e} 0 0 {f} 0 0 0 0 0 0
intr 1 2 3
"""


def test_busy_cores_are_read_from_proc_stat() -> None:
    before = openmp.parse_stat(STAT.format(all=0, a=100, b=50, c=800, d=50, e=0, f=1000), [0, 1])
    # cpu0: 15 ticks of work, 5 idle; cpu1: 2 of work, 18 idle (of 40 ticks, 17 busy).
    after = openmp.parse_stat(STAT.format(all=0, a=110, b=55, c=803, d=52, e=2, f=1018), [0, 1])
    assert before == (2000, 1850) and after == (2040, 1873)
    assert openmp.busy_cores(before, after, 2) == pytest.approx(2 * 17 / 40)
    assert openmp.parse_stat(STAT.format(all=0, a=1, b=1, c=1, d=1, e=1, f=1), [1]) == (2, 1)
    with pytest.raises(ValueError):
        openmp.parse_stat(STAT.format(all=0, a=1, b=1, c=1, d=1, e=1, f=1), [0, 2])


@contextlib.contextmanager
def _busy_process() -> Iterator[None]:
    """Another process running without pause for the length of the block."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc/stat")
def test_a_busy_process_beside_is_seen() -> None:
    """While another process runs without pause, no CPU this process may use is ever idle: the
    measure sees at least the half core it counts as busy, whatever else runs."""
    with _busy_process():
        assert openmp.machine_busy() is True


@pytest.mark.skipif(not GLIBC, reason="checked with the Linux wheels' GNU OpenMP")
def test_threads_do_not_spin_beside_a_busy_process() -> None:
    """Beside a busy process, fedssd's default makes the idle OpenMP thread sleep at once; with
    libgomp's own default (300,000 spins) it burns milliseconds of CPU after every parallel
    operation, which the busy machine's other processes needed."""
    with _busy_process():
        assert spin_seconds({}) < 0.005  # five waits; about 0.1 ms each on the development machine


@pytest.mark.slow
def test_the_wait_policy_leaves_results_bit_identical(tmp_path: Path) -> None:
    """The same run on 2 threads with the wait policy fedssd sets on a busy machine and with
    libgomp's default, which it keeps on an idle one."""
    smoke = Path(__file__).resolve().parents[1] / "src" / "fedssd" / "configs" / "smoke.toml"
    tiny = ["data.train_subset=200", "data.test_subset=100", "model.width=4"]
    tiny += ["model.projector_hidden=16", "federation.rounds=1", "federation.batch_size=32"]
    tiny += ["evaluation.every=0", "evaluation.linear_epochs=0", "evaluation.metrics_samples=100"]
    tiny += ["evaluation.metrics_per_client=20"]
    models = []
    for name, env in (
        ("passive", {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("spinning", {"GOMP_SPINCOUNT": "300000"}),
    ):
        clean = {k: v for k, v in os.environ.items() if k not in openmp.USER_SETTINGS}
        command = [sys.executable, "-m", "fedssd.cli", "train", "--config", str(smoke)]
        command += [arg for item in tiny for arg in ("--set", item)]
        command += ["--threads", "2", "--out", str(tmp_path / name), "--quiet"]
        subprocess.run(command, env={**clean, **env}, check=True, timeout=600)
        models.append((tmp_path / name / "model.safetensors").read_bytes())
    assert models[0] == models[1]
