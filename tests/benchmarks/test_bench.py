"""The benchmark: quick mode at tiny sizes writes every key, and its arithmetic is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import bench
from fedssd.models import SSLModel, build_model

TINY = bench.BenchConfig(
    mode="test",
    encoder=bench.SmallEncoder(width=4, projector_hidden=16),
    batch_size=8,
    efficiency_batches=1,
    efficiency_reps=1,
    overhead_clients=(3, 16),
    small_clients=(20, 4),
    overhead_rounds=2,
    scaling_clients=(2, 3),
    scaling_images=(48,),
    dataloader_images=16,
    dataloader_workers=(0,),
    dataloader_reps=1,
    gpu_steps=1,
    gpu_clients=2,
    gpu_compile=False,
    busy_reps=1,
    busy_overrides=(
        "federation.rounds=1",
        "data.train_subset=200",
        "data.test_subset=100",
        "model.width=4",
        "evaluation.every=0",
        "evaluation.linear_epochs=0",
        "evaluation.metrics_samples=100",
        "evaluation.metrics_per_client=20",
    ),
    busy_compare=False,
)


def _tracked_state(root: Path) -> str:
    """``git status`` of the tracked files (untracked and ignored ones left out)."""
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.mark.slow
def test_quick_mode_writes_every_figure_and_leaves_tracked_files_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One quick run, as `make bench-quick` makes it (its JSON under ./runs/bench): every figure
    is there and right, and no file git tracks changed, the committed record included."""
    root = Path(__file__).resolve().parents[2]
    in_git = (root / ".git").exists()  # not in an unpacked sdist: nothing is tracked there
    monkeypatch.setattr(bench, "QUICK", TINY)
    reference = bench.REFERENCE.read_bytes()
    before = _tracked_state(root) if in_git else ""
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--quick"]) == 0
    assert bench.REFERENCE.read_bytes() == reference
    if in_git:
        assert _tracked_state(root) == before
    results = json.loads((tmp_path / "runs" / "bench" / "latest.json").read_text())
    for key in (
        "train_efficiency",
        "round_overhead",
        "round_overhead_small_clients",
        "speedup_vs_dataloader",
        "scaling",
        "gpu",
        "busy_machine",
        "machine",
    ):
        assert key in results, key
    busy = results["busy_machine_detail"]["fedssd"]
    assert results["busy_machine"] == busy["busy_over_idle"]
    (idle,), (loaded,) = busy["idle_train_s"], busy["busy_train_s"]
    assert busy["busy_over_idle"] == pytest.approx(loaded / idle)
    assert results["machine"]["torch"] == torch.__version__
    assert results["train_efficiency"] > 0 and results["speedup_vs_dataloader"] > 0
    for key in ("round_overhead", "round_overhead_small_clients"):
        detail = results[f"{key}_detail"]
        assert 0.0 <= results[key] < 1.0
        # The overhead is the wall time not spent in local training, split into its parts.
        wall = detail["round_s"] * detail["rounds"]
        assert detail["overhead_s"] == pytest.approx(wall - detail["local_train_s"])
        assert sum(detail["overhead_parts_s"].values()) == pytest.approx(detail["overhead_s"])
    assert results["round_overhead_detail"]["dataset_images"] == 3 * 16
    # K = 20 is more clients than the tiny encoder's 16 features: SSD runs without PD.
    assert "PD off" in results["round_overhead_small_clients_detail"]["method"]
    table = results["scaling"]
    assert [(r["clients"], r["dataset_images"]) for r in table] == [(2, 48), (3, 48)]
    gpu = results["gpu"]
    if not torch.cuda.is_available():
        assert gpu["image_pairs_per_s"] is None and gpu["projected_protocol_minutes"] is None
        assert "no CUDA" in gpu["reason"]
        assert gpu["cpu_smoke"]["image_pairs_per_s"] > 0
    assert gpu["protocol_image_pairs"] == 50_000 * 100 * 5


@pytest.mark.slow
def test_flop_count_matches_a_hand_count() -> None:
    def factory() -> nn.Module:
        encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
        return SSLModel(encoder=encoder, projector=nn.Linear(16, 8), feature_dim=16, embed_dim=8)

    forward = 2 * 192 * 16 + 2 * 16 * 8
    # Backward: weight gradients of both layers, input gradient only of the projector (the
    # images need none); per view, and two views per image pair.
    backward = 2 * 192 * 16 + 2 * (2 * 16 * 8)
    assert bench.flops_per_image_pair(factory, size=8) == 2 * (forward + backward)


def test_resnet18_flops_agree_with_the_issue_estimate() -> None:
    flops = bench.flops_per_image_pair(
        lambda: build_model(encoder="resnet18", projector_hidden=2048, projector_out=None)
    )
    # Issue 6: about 1.7e17 FLOPs for the paper's 25 million two-view passes.
    assert flops * bench.protocol_image_pairs() == pytest.approx(1.7e17, rel=0.03)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Some Future GPU", None),
    ],
)
def test_peak_table_lookup(name: str, peak: float | None) -> None:
    assert bench.bf16_peak_tflops(name) == peak
