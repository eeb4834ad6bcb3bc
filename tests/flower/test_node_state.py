"""A SuperNode's client state on disk: the version a round loads, pruning, and damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedssd.errors import ConfigError, DataError
from fedssd.flower.node_state import client_folder, load_client_state, save_client_state
from fedssd.methods.protocol import ClientState


def _state(value: float, round_index: int) -> ClientState:
    return ClientState(
        tensors={"target.weight": torch.full((2, 3), value)},
        scalars={"lambda": value / 10},
        last_round=round_index,
        participations=int(value),
    )


def _versions(folder: Path) -> list[int]:
    return sorted(int(p.name[6:]) for p in (folder / "checkpoints").iterdir())


def test_each_round_loads_the_state_written_before_it(tmp_path: Path) -> None:
    # The client trained in rounds 0, 2 and 5 (indices); versions are named by rounds done.
    for value, round_index in ((1.0, 0), (2.0, 2), (3.0, 5)):
        save_client_state(
            tmp_path, "run1", 4, _state(value, round_index), round_index=round_index, horizon=100
        )
    assert load_client_state(tmp_path, "run1", 4, round_index=0) is None
    expected = {1: 1.0, 2: 1.0, 3: 2.0, 5: 2.0, 6: 3.0, 9: 3.0}
    for round_index, value in expected.items():
        loaded = load_client_state(tmp_path, "run1", 4, round_index=round_index)
        assert loaded is not None
        assert torch.equal(loaded.tensors["target.weight"], torch.full((2, 3), value))
        assert loaded.scalars == {"lambda": value / 10}
        assert loaded.participations == int(value)
    # Another client or another run sees nothing.
    assert load_client_state(tmp_path, "run1", 3, round_index=9) is None
    assert load_client_state(tmp_path, "run2", 4, round_index=9) is None


def test_versions_older_than_the_resume_horizon_are_pruned(tmp_path: Path) -> None:
    for round_index in range(10):
        save_client_state(
            tmp_path, "r", 0, _state(float(round_index), round_index), round_index=round_index,
            horizon=3,
        )  # fmt: skip
    # After round index 9 (10 rounds done) a resume can go back to 7 rounds done: versions 8..10
    # are needed, and 7, the newest before them, is what round 7 loads.
    assert _versions(client_folder(tmp_path, "r", 0)) == [7, 8, 9, 10]
    loaded = load_client_state(tmp_path, "r", 0, round_index=7)
    assert loaded is not None and loaded.last_round == 6


def test_a_redone_round_replaces_its_version(tmp_path: Path) -> None:
    save_client_state(tmp_path, "r", 0, _state(1.0, 3), round_index=3, horizon=10)
    save_client_state(tmp_path, "r", 0, _state(9.0, 3), round_index=3, horizon=10)
    loaded = load_client_state(tmp_path, "r", 0, round_index=4)
    assert loaded is not None and loaded.scalars == {"lambda": 0.9}


def test_a_damaged_version_is_refused_in_one_sentence(tmp_path: Path) -> None:
    written = save_client_state(tmp_path, "r", 1, _state(1.0, 0), round_index=0, horizon=1)
    tensors = written / "clients.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8])
    with pytest.raises(DataError, match="corrupted or truncated"):
        load_client_state(tmp_path, "r", 1, round_index=1)


@pytest.mark.parametrize("key", ["", "..", "a/b", "x" * 200])
def test_an_unusable_run_key_is_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="run key"):
        client_folder(tmp_path, key, 0)
