"""The many-clients benchmark at tiny sizes: every figure is there and adds up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import bench, scaling

TINY = scaling.ScalingConfig(
    mode="test",
    clients=(4, 12),
    per_round=2,
    rounds=3,
    images_per_client=4,
    batch_size=4,
    pool_images=16,
    encoder=bench.SmallEncoder(width=4, projector_hidden=16),
    in_memory_clients=12,
    split_clients=100,
    split_labels=1000,
)


@pytest.mark.slow
def test_tiny_scaling_writes_every_figure() -> None:
    results = scaling.run(TINY, say=lambda _line: None)
    for row in results["rows"]:
        assert row["on_disk"] and row["peak_rss_bytes"] > 0
        # One round's clients in memory, every state seen on disk.
        assert max(row["states_in_memory_after_each_round"]) <= TINY.per_round
        assert row["clients_seen"] >= TINY.per_round
        for checkpoint in row["checkpoints"]:
            assert checkpoint["clients_trained"] == TINY.per_round
            assert checkpoint["state_files_bytes"] == pytest.approx(
                TINY.per_round * row["state_bytes"], rel=0.01
            )
        assert 0.0 < row["overhead"] < 1.0
    before = results["in_memory"]
    assert not before["on_disk"]
    assert before["states_in_memory_after_each_round"][-1] == before["clients_seen"]
    targets = results["targets"]
    assert targets["checkpoint_state_bytes_proportional_to_clients_trained"]["met"]
    assert targets["round_overhead_largest_k"]["clients"] == 12
    resnet = results["resnet18"]
    assert resnet["state_bytes"] > resnet["model_bytes"]  # FedEMA keeps two networks
    assert [p["clients"] for p in results["projection_resnet18"]] == [4, 12]
    for name in ("iid", "dirichlet", "pathological"):
        assert results["split"][name]["split_s"] >= 0.0
