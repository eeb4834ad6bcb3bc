"""Checkpoints: everything a run needs to continue, written so that a crash never breaks one.

A checkpoint is a folder ``<run>/checkpoints/round-NNNNNN/`` holding ``model.safetensors`` (the
global model), ``server.safetensors`` (the method's server state), ``clients.safetensors`` (the
client store's index: each client's id and the SHA-256 of the file holding its state) and
``state.json`` (the round, the metrics so far, what run it belongs to, the training time so far,
and the SHA-256 of each tensor file). The client states themselves are files in
``<run>/client-states/`` (:mod:`fedssd.runs.store`), shared by the checkpoints that hold the
same state: a checkpoint writes only the states that changed since the one before it, and files no
checkpoint refers to any more are deleted after each write. A checkpoint folder is written under a
temporary name and renamed into place, so the newest complete checkpoint is always intact; older
ones beyond ``keep`` are then deleted. Loading reads safetensors and JSON only (nothing is
unpickled) and refuses a truncated, corrupted or foreign checkpoint in one sentence; each client
state file is checked when the run first reads it.

Checkpoints of format 1 (every client's tensors in ``clients.safetensors``, their scalars in
``state.json``) are still read.

All random numbers of a run are derived from the run seed and the round (fedssd.seeding), so the
round number restores every random stream: there is no generator state to save. The exception,
by design, is a differentially private run's secret generator (fedssd.federation.privacy): it is
never saved, and a resumed run draws a new secret.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedssd.errors import DataError
from fedssd.runs.outputs import fsync_path, jsonable, save_model, write_json
from fedssd.runs.store import (
    ClientStore,
    index_from_tensors,
    index_tensors,
    remove_unreferenced,
)

FORMAT_VERSION = 2
_READABLE_FORMATS = (1, 2)
FOLDER = "checkpoints"
STATES = "client-states"
_TENSOR_FILES = ("model", "server", "clients")


@dataclasses.dataclass
class Checkpoint:
    """The state of a run after ``rounds_done`` rounds.

    Attributes:
        rounds_done: Rounds completed (the resumed run starts with round index ``rounds_done``).
        model: The global model's state dict.
        server: The method's server state.
        store: The client store.
        history: The per-round records so far (the lines of ``metrics.jsonl``).
        identity: What run it belongs to (see :func:`run_identity`).
        train_seconds: The run's training time up to this checkpoint, over every stretch of a
            resumed run (0 in a checkpoint written before it was kept).
    """

    rounds_done: int
    model: dict[str, torch.Tensor]
    server: dict[str, torch.Tensor]
    store: ClientStore
    history: list[dict[str, Any]]
    identity: dict[str, Any]
    train_seconds: float = 0.0


#: Keys added to the config after checkpoints were first written, with the value that reproduces
#: the runs made before them: at that value a key is left out of the run identity, so that those
#: runs' checkpoints still resume (any other value is part of the identity).
LATER_DEFAULTS: dict[str, dict[str, Any]] = {
    "data": {"resize": "box", "dirichlet_rule": "redraw"},
    "federation": {"drop_last": False, "sampling": "fixed"},
    "method": {"dsr_dims": 0},
}


def run_identity(config_data: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a resolved config a checkpoint must match: seed, data, model, method,
    federation (the rest, e.g. evaluation settings, may differ on resume)."""
    keys = ("seed", "data", "model", "method", "federation")
    identity = {key: jsonable(config_data[key]) for key in keys if key in config_data}
    for table, defaults in LATER_DEFAULTS.items():
        section = identity.get(table)
        if isinstance(section, dict):
            identity[table] = {
                k: v for k, v in section.items() if k not in defaults or defaults[k] != v
            }
    # Differential privacy changes the training: a DP run resumes only with its own settings (a
    # run without DP keeps the identity it had before the [privacy] table existed).
    privacy = config_data.get("privacy", {})
    if privacy.get("dp", "off") != "off":
        identity["privacy"] = jsonable(privacy)
    return identity


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint, *, keep: int) -> Path:
    """Write ``checkpoint`` atomically and delete all but the ``keep`` newest.

    Returns:
        The checkpoint's folder.
    """
    root = run_dir / FOLDER
    root.mkdir(exist_ok=True)
    final = root / f"round-{checkpoint.rounds_done:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index = checkpoint.store.flush(states_folder(run_dir))
    tensors = {
        "model": checkpoint.model,
        "server": checkpoint.server,
        "clients": index_tensors(index),
    }
    digests = {}
    for name, state in tensors.items():
        path = tmp / f"{name}.safetensors"
        save_model(path, state)
        digests[name] = _sha256(path)
    write_json(
        tmp / "state.json",
        {
            "format": FORMAT_VERSION,
            "rounds_done": checkpoint.rounds_done,
            "identity": checkpoint.identity,
            "sha256": digests,
            "history": checkpoint.history,
            "train_seconds": checkpoint.train_seconds,
        },
    )
    fsync_path(tmp, best_effort=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root, best_effort=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_unreferenced_states(run_dir)
    return final


def states_folder(run_dir: Path) -> Path:
    """Where a run's client state files are (:mod:`fedssd.runs.store`)."""
    return run_dir / STATES


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete temporary folders and files left by checkpoint writes that were killed mid-way, and
    the client states written after the newest checkpoint."""
    for partial in (*(run_dir / FOLDER).glob(".tmp-*"), *states_folder(run_dir).glob(".tmp-*")):
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
    remove_unreferenced_states(run_dir)


def remove_unreferenced_states(run_dir: Path) -> int:
    """Delete the client state files that no checkpoint of the run refers to. Nothing is deleted
    while a checkpoint's index cannot be read (a damaged one may still refer to a file).

    Returns:
        How many files were deleted.
    """
    referenced: set[str] = set()
    for path in list_checkpoints(run_dir):
        try:
            referenced.update(_client_index(path).values())
        except (DataError, OSError, KeyError, TypeError, ValueError, SafetensorError):
            return 0
    return remove_unreferenced(states_folder(run_dir), referenced)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = run_dir / FOLDER
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("round-"))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder, verifying every file.

    Raises:
        DataError: A file is missing, truncated, corrupted or not a fedssd checkpoint.
    """
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"checkpoint {path} has no state.json; it is incomplete.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"checkpoint {path}/state.json is corrupted (not valid JSON).") from None
    if not isinstance(meta, dict) or meta.get("format") not in _READABLE_FORMATS:
        raise DataError(
            f"checkpoint {path} is not a fedssd checkpoint of a format this version reads "
            f"({', '.join(map(str, _READABLE_FORMATS))})."
        )
    try:
        digests = meta["sha256"]
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for name in _TENSOR_FILES:
            file = path / f"{name}.safetensors"
            if not file.is_file():
                raise DataError(f"checkpoint {path} is missing {file.name}.")
            if _sha256(file) != digests[name]:
                raise DataError(
                    f"checkpoint file {file} is corrupted or truncated (its SHA-256 does not "
                    "match the one recorded when it was written)."
                )
            tensors[name] = load_file(str(file))
        if meta["format"] == 1:
            store = ClientStore.restore(meta["clients"], tensors["clients"])
        else:
            store = _saved_store(path, index_from_tensors(tensors["clients"]))
        return Checkpoint(
            rounds_done=int(meta["rounds_done"]),
            model=tensors["model"],
            server=tensors["server"],
            store=store,
            history=list(meta["history"]),
            identity=dict(meta["identity"]),
            train_seconds=float(meta.get("train_seconds", 0.0)),
        )
    except (KeyError, TypeError, ValueError, SafetensorError) as error:
        raise DataError(f"checkpoint {path} is malformed ({error}).") from None


def check_model_state(
    expected: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor], *, where: Path
) -> None:
    """Refuse a saved model state whose entries or shapes differ from the model's.

    Raises:
        DataError: In one sentence naming the first difference.
    """
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has an unknown entry {extra[0]!r}"
        raise DataError(f"checkpoint {where} does not fit this run's model: it {what}.")
    for key, value in expected.items():
        if saved[key].shape != value.shape or saved[key].dtype != value.dtype:
            raise DataError(
                f"checkpoint {where} does not fit this run's model: {key!r} is "
                f"{tuple(saved[key].shape)} {saved[key].dtype}, the model's is "
                f"{tuple(value.shape)} {value.dtype}."
            )


def _saved_store(path: Path, index: Mapping[int, str]) -> ClientStore:
    """The store of checkpoint ``path`` from its index; every file it names must exist.

    Raises:
        DataError: A client state file is missing.
    """
    folder = path.parent.parent / STATES
    for client_id, digest in index.items():
        if not (folder / f"{digest}.safetensors").is_file():
            raise DataError(
                f"checkpoint {path} refers to client {client_id}'s state file "
                f"{digest}.safetensors, which is missing from {folder}."
            )
    return ClientStore(folder, saved=index)


def _client_index(path: Path) -> dict[int, str]:
    """The client index of checkpoint ``path`` (empty for format 1, which has no state files)."""
    meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if meta["format"] == 1:
        return {}
    file = path / "clients.safetensors"
    if _sha256(file) != meta["sha256"]["clients"]:
        raise DataError(f"checkpoint file {file} is corrupted or truncated.")
    return index_from_tensors(load_file(str(file)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
