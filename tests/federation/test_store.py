"""The client store on disk: one verified file per state, a bounded cache, checkpoints that write
only what changed, and nothing written after a checkpoint leaking into a resume from it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import fedssd
from fedssd.errors import DataError
from fedssd.methods.protocol import ClientState
from fedssd.runs import store as store_module
from fedssd.runs.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
    states_folder,
)
from fedssd.runs.store import (
    ClientStore,
    decode_state,
    encode_state,
    index_from_tensors,
    read_state,
    write_state,
)

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "src" / "fedssd" / "configs" / "smoke.toml")


def _state(value: float, round_index: int = 0) -> ClientState:
    return ClientState(
        tensors={
            "target.weight": torch.full((3, 2), value),
            "target.steps": torch.tensor([int(value)], dtype=torch.int64),
        },
        scalars={"lambda": value / 10, "div": float("nan")},
        last_round=round_index,
        participations=int(value) + 1,
    )


def _same(a: ClientState | None, b: ClientState) -> bool:
    assert a is not None
    return (
        list(a.tensors) == list(b.tensors)  # in the same order
        and all(
            torch.equal(a.tensors[k], v) and a.tensors[k].dtype == v.dtype
            for k, v in b.tensors.items()
        )
        and json.dumps(a.scalars) == json.dumps(b.scalars)
        and (a.last_round, a.participations) == (b.last_round, b.participations)
    )


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.safetensors")}


def _checkpoint(done: int, store: ClientStore) -> Checkpoint:
    return Checkpoint(
        rounds_done=done, model={"w": torch.zeros(2)}, server={}, store=store, history=[],
        identity={"seed": 1},
    )  # fmt: skip


def test_a_state_file_round_trips_and_is_named_by_its_content(tmp_path: Path) -> None:
    state = _state(2.0, round_index=4)
    assert encode_state(state) == encode_state(_state(2.0, round_index=4))  # same state, same bytes
    assert _same(decode_state(encode_state(state)), state)
    digest = write_state(tmp_path, state)
    data = (tmp_path / f"{digest}.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == digest
    assert _same(read_state(tmp_path, digest), state)
    assert not list(tmp_path.glob(".tmp-*"))
    assert _same(decode_state(encode_state(ClientState())), ClientState())  # no tensors at all


def test_a_store_keeps_at_most_capacity_states_in_memory(tmp_path: Path) -> None:
    store = ClientStore()
    store.spill(tmp_path, capacity=2)
    for client_id in range(6):
        store.put(client_id, _state(float(client_id)))
        assert store.in_memory <= 2
    assert len(store) == 6 and list(store) == list(range(6))
    assert len(_files(tmp_path)) == 4  # the four least recently used went to disk
    for client_id in (0, 5, 3, 0):
        assert _same(store.get(client_id), _state(float(client_id)))
        assert store.in_memory <= 2
    assert store.get(6) is None


def test_a_checkpoint_writes_only_the_states_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real = store_module.write_state

    def counted(folder: Path, state: ClientState) -> str:
        written.append(state.participations)
        return real(folder, state)

    monkeypatch.setattr(store_module, "write_state", counted)
    store = ClientStore()
    store.spill(states_folder(tmp_path), capacity=3)
    for client_id in range(5):
        store.put(client_id, _state(float(client_id)))
    save_checkpoint(tmp_path, _checkpoint(1, store), keep=1)
    first = _files(states_folder(tmp_path))
    assert len(first) == 5 and len(written) == 5
    written.clear()
    for client_id in (1, 2, 4):
        store.get(client_id)  # read, not changed
    for client_id in (0, 3):
        store.put(client_id, _state(10.0 + client_id, round_index=1))
    save_checkpoint(tmp_path, _checkpoint(2, store), keep=1)
    second = _files(states_folder(tmp_path))
    assert written == [11, 14]  # the two changed states, nothing else rewritten
    assert len(second - first) == 2
    assert len(second) == 5  # the replaced versions were referenced only by checkpoint 1
    loaded = load_checkpoint(list_checkpoints(tmp_path)[-1]).store
    assert _same(loaded.get(3), _state(13.0, round_index=1))
    assert _same(loaded.get(4), _state(4.0))
    index = index_from_tensors(
        load_file(str(list_checkpoints(tmp_path)[-1] / "clients.safetensors"))
    )
    assert sorted(index) == list(range(5))


def test_states_written_after_a_checkpoint_do_not_reach_a_resume_from_it(tmp_path: Path) -> None:
    store = ClientStore()
    store.spill(states_folder(tmp_path), capacity=1)
    for client_id in range(3):
        store.put(client_id, _state(float(client_id)))
    save_checkpoint(tmp_path, _checkpoint(1, store), keep=2)
    for client_id in range(3):  # the next round, spilled to disk, then a crash
        store.put(client_id, _state(20.0 + client_id, round_index=1))
    (states_folder(tmp_path) / ".tmp-abc-1").write_bytes(b"half a file")
    assert len(_files(states_folder(tmp_path))) == 5
    resumed = load_checkpoint(list_checkpoints(tmp_path)[-1]).store
    for client_id in range(3):
        assert _same(resumed.get(client_id), _state(float(client_id)))
    remove_partial_checkpoints(tmp_path)  # what resume does first
    assert len(_files(states_folder(tmp_path))) == 3
    assert not list(states_folder(tmp_path).glob(".tmp-*"))


def test_a_damaged_or_missing_state_file_is_refused_in_one_sentence(tmp_path: Path) -> None:
    store = ClientStore()
    store.put(7, _state(7.0))
    save_checkpoint(tmp_path, _checkpoint(1, store), keep=1)
    (file,) = states_folder(tmp_path).glob("*.safetensors")
    data = file.read_bytes()
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    loaded = load_checkpoint(list_checkpoints(tmp_path)[-1]).store
    with pytest.raises(DataError, match="corrupted or truncated"):
        loaded.get(7)
    file.unlink()
    with pytest.raises(DataError, match=r"client 7's state file .* is missing"):
        load_checkpoint(list_checkpoints(tmp_path)[-1])


def test_a_format_1_checkpoint_is_still_read(tmp_path: Path) -> None:
    """Runs checkpointed before the state files existed still resume."""
    folder = tmp_path / "checkpoints" / "round-000002"
    folder.mkdir(parents=True)
    files = {
        "model": {"w": torch.ones(2)},
        "server": {},
        "clients": {"3/target.weight": torch.full((3, 2), 3.0)},
    }
    digests = {}
    for name, tensors in files.items():
        save_file(tensors, str(folder / f"{name}.safetensors"))
        digests[name] = hashlib.sha256((folder / f"{name}.safetensors").read_bytes()).hexdigest()
    meta: dict[str, Any] = {
        "format": 1,
        "rounds_done": 2,
        "identity": {"seed": 1},
        "clients": {
            "3": {
                "scalars": {"lambda": 0.3},
                "last_round": 1,
                "participations": 2,
                "tensors": ["target.weight"],
            }
        },
        "sha256": digests,
        "history": [],
    }
    (folder / "state.json").write_text(json.dumps(meta))
    store = load_checkpoint(folder).store
    restored = store.get(3)
    assert restored is not None and restored.scalars == {"lambda": 0.3}
    assert torch.equal(restored.tensors["target.weight"], torch.full((3, 2), 3.0))
    # The resumed run's next checkpoint writes the states as files.
    store.spill(states_folder(tmp_path), capacity=1)
    save_checkpoint(tmp_path, _checkpoint(3, store), keep=2)
    assert len(_files(states_folder(tmp_path))) == 1
    assert _same(load_checkpoint(list_checkpoints(tmp_path)[-1]).store.get(3), restored)


@pytest.mark.slow
def test_a_cross_device_run_writes_per_checkpoint_only_the_clients_of_its_rounds(
    tmp_path: Path,
) -> None:
    """FedEMA with 8 clients, 2 a round, a checkpoint every round: each checkpoint adds the
    states of the round's 2 clients, and only they are files no earlier checkpoint refers to."""
    run = tmp_path / "run"
    fedssd.train(
        SMOKE,
        overrides=[
            "data.train_subset=400",
            "data.test_subset=100",
            "data.partition=iid",
            "model.width=4",
            "model.projector_hidden=16",
            "method.name=fedema",
            "federation.num_clients=8",
            "federation.fraction=0.25",
            "federation.rounds=4",
            "federation.batch_size=16",
            "evaluation.every=0",
            "evaluation.linear_epochs=0",
            "evaluation.metrics_samples=100",
            "evaluation.metrics_per_client=10",
            "checkpoint.every=1",
            "checkpoint.keep=4",
        ],
        out=run,
        log=None,
    )
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seen: set[str] = set()
    clients_so_far: set[int] = set()
    for checkpoint, record in zip(list_checkpoints(run), history, strict=True):
        index = index_from_tensors(load_file(str(checkpoint / "clients.safetensors")))
        trained = set(record["clients"])
        clients_so_far |= trained
        assert set(index) == clients_so_far
        new = set(index.values()) - seen
        assert len(new) == len(trained) == 2
        assert {index[c] for c in trained} == new
        seen |= new
    assert _files(states_folder(run)) == {f"{d}.safetensors" for d in seen}
