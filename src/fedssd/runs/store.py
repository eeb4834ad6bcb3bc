"""The client store: what each client keeps between rounds, keyed by its id.

In cross-device runs a client is seen once every few rounds (docs/methods.md, "Per-client
state"), so its state (a target network, a predictor, FedEMA's lambda) must survive the rounds
in between and be saved with the checkpoint. With ten thousand clients of a ResNet-18 that is
hundreds of gigabytes, so a store given a folder keeps only the ``capacity`` most recently used
states in memory and the others in files there, one per state:

    <folder>/<SHA-256 of the file>.safetensors

Each file holds one :class:`ClientState` (its tensors, and its scalars and counters as JSON in
the safetensors metadata). Files are named by their content, written under a temporary name,
fsynced and renamed, and never overwritten with other content: a checkpoint refers to the files
of the states it holds (:meth:`ClientStore.flush` returns that index), and a state that changes
later goes to a new file, so whatever a run writes after a checkpoint cannot change what resuming
from that checkpoint reads. Reading a file checks its SHA-256 against its name. Files that no
checkpoint refers to any more are deleted by :func:`remove_unreferenced`.

A store without a folder keeps every state in memory (runs without an output folder, tests).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fedssd.errors import DataError
from fedssd.methods.protocol import ClientState

_META_KEY = "fedssd-client-state"
_SUFFIX = ".safetensors"
_DIGEST_BYTES = 32


def stamp_participation(
    kept: ClientState, previous: ClientState | None, round_index: int
) -> ClientState:
    """Mark ``kept`` (what a client keeps after training in ``round_index``) with that round and
    one participation more than ``previous`` (its state before the round, None the first time).

    Returns:
        ``kept``, updated in place.
    """
    kept.last_round = round_index
    kept.participations = (previous.participations if previous else 0) + 1
    return kept


class ClientStore:
    """Per-client :class:`ClientState`, keyed by client id (never by position in a sample).

    Args:
        folder: Where states beyond ``capacity`` and flushed states are written (None: keep
            everything in memory).
        capacity: How many states stay in memory at most when there is a folder (None: all).
        saved: Client id -> SHA-256 of the file in ``folder`` holding its state (a checkpoint's
            index, from :meth:`flush`).
    """

    def __init__(
        self,
        folder: Path | None = None,
        *,
        capacity: int | None = None,
        saved: Mapping[int, str] | None = None,
    ) -> None:
        if saved and folder is None:
            raise ValueError("a store with saved states needs their folder")
        self._folder = folder
        self._capacity = capacity
        # Recently used states, oldest first. A state that is here and not in _files has not been
        # written yet (it changed since it was last read or written).
        self._cache: collections.OrderedDict[int, ClientState] = collections.OrderedDict()
        self._files: dict[int, str] = dict(saved or {})

    @property
    def folder(self) -> Path | None:
        """Where the states' files are (None: in memory only)."""
        return self._folder

    @property
    def in_memory(self) -> int:
        """How many states are held in memory now."""
        return len(self._cache)

    def spill(self, folder: Path, *, capacity: int) -> None:
        """From now on keep at most ``capacity`` states in memory and the rest in ``folder``.

        Raises:
            ValueError: The store already writes to another folder.
        """
        self._adopt(folder)
        self._capacity = max(1, capacity)
        self._evict()

    def get(self, client_id: int) -> ClientState | None:
        """The client's state, or None before its first participation.

        Raises:
            DataError: Its file is missing, truncated or corrupted.
        """
        state = self._cache.get(client_id)
        if state is not None:
            self._cache.move_to_end(client_id)
            return state
        digest = self._files.get(client_id)
        if digest is None:
            return None
        assert self._folder is not None  # __init__ and _adopt keep files and a folder together
        state = read_state(self._folder, digest)
        self._cache[client_id] = state
        self._evict()
        return state

    def put(self, client_id: int, state: ClientState) -> None:
        """Keep ``state`` for ``client_id``, its tensors moved to the CPU."""
        state.tensors = {k: v.detach().to("cpu", copy=True) for k, v in state.tensors.items()}
        self._files.pop(client_id, None)
        self._cache[client_id] = state
        self._cache.move_to_end(client_id)
        self._evict()

    def flush(self, folder: Path) -> dict[int, str]:
        """Write every state not on disk yet to ``folder`` and return the whole store's index.

        A store in memory only takes ``folder`` as its folder from now on.

        Returns:
            Client id -> SHA-256 of the file holding its state, for every client, by id.

        Raises:
            ValueError: The store already writes to another folder.
        """
        self._adopt(folder)
        for client_id, state in self._cache.items():
            if client_id not in self._files:
                self._files[client_id] = write_state(folder, state)
        _fsync_folder(folder)  # the renames of the files a checkpoint will refer to
        return dict(sorted(self._files.items()))

    def __len__(self) -> int:
        return len(self._cache.keys() | self._files.keys())

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._cache.keys() | self._files.keys()))

    @classmethod
    def restore(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> ClientStore:
        """The in-memory store of a checkpoint of format 1 (``clients.safetensors`` holding every
        client's tensors as ``"<client id>/<name>"`` and ``state.json`` the rest).

        Raises:
            ValueError: The two parts do not describe the same clients.
        """
        store = cls()
        for key, entry in meta.items():
            names = entry["tensors"]
            store._cache[int(key)] = ClientState(
                tensors={name: tensors[f"{key}/{name}"] for name in names},
                scalars={str(k): float(v) for k, v in entry["scalars"].items()},
                last_round=int(entry["last_round"]),
                participations=int(entry["participations"]),
            )
        if sum(len(s.tensors) for s in store._cache.values()) != len(tensors):
            raise ValueError("the client store's tensors and its index disagree")
        return store

    def _adopt(self, folder: Path) -> None:
        if self._folder is None:
            self._folder = folder
        elif Path(self._folder) != Path(folder):
            raise ValueError(f"the client store writes to {self._folder}, not {folder}")

    def _evict(self) -> None:
        """Write the least recently used states beyond the capacity, then forget them."""
        if self._folder is None or self._capacity is None:
            return
        while len(self._cache) > self._capacity:
            client_id, state = self._cache.popitem(last=False)
            if client_id not in self._files:
                self._files[client_id] = write_state(self._folder, state)


# ----------------------------------------------------------------------------- the files


def encode_state(state: ClientState) -> bytes:
    """One client's state as the bytes of a safetensors file (the same state, the same bytes).

    The order of the tensors and scalars is kept (safetensors sorts tensors by their name), so a
    state read back iterates as the one written: a sum over its tensors adds in the same order.
    """
    meta = {
        "tensors": list(state.tensors),
        "scalars": {str(k): float(v) for k, v in state.scalars.items()},
        "last_round": int(state.last_round),
        "participations": int(state.participations),
    }
    return save_tensors(
        {k: v.contiguous() for k, v in state.tensors.items()},
        metadata={_META_KEY: json.dumps(meta)},
    )


def decode_state(data: bytes) -> ClientState:
    """The state :func:`encode_state` wrote.

    Raises:
        ValueError: The bytes are not a client state file.
    """
    try:
        tensors = load_tensors(data)
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + size])["__metadata__"][_META_KEY])
        names = [str(name) for name in meta["tensors"]]
        if sorted(names) != sorted(tensors):
            raise ValueError("its tensors and their list disagree")
        return ClientState(
            tensors={name: tensors[name] for name in names},
            scalars={str(k): float(v) for k, v in meta["scalars"].items()},
            last_round=int(meta["last_round"]),
            participations=int(meta["participations"]),
        )
    except (SafetensorError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"not a client state file ({error})") from None


def write_state(folder: Path, state: ClientState) -> str:
    """Write ``state`` to ``folder`` atomically (temporary name, fsync, rename).

    Returns:
        The SHA-256 of the file, which is also its name.
    """
    data = encode_state(state)
    digest = hashlib.sha256(data).hexdigest()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{digest}{_SUFFIX}"
    tmp = folder / f".tmp-{digest}-{os.getpid()}"
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def read_state(folder: Path, digest: str) -> ClientState:
    """The state in ``folder``'s file ``digest``, after checking the file's SHA-256.

    Raises:
        DataError: The file is missing, truncated or corrupted.
    """
    path = folder / f"{digest}{_SUFFIX}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"client state file {path} is missing.") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise DataError(
            f"client state file {path} is corrupted or truncated (its SHA-256 does not match "
            "its name)."
        )
    try:
        return decode_state(data)
    except ValueError as error:
        raise DataError(f"client state file {path} is malformed: {error}.") from None


def index_tensors(index: Mapping[int, str]) -> dict[str, torch.Tensor]:
    """A store's index (:meth:`ClientStore.flush`) as tensors, for a checkpoint's safetensors:
    ``id`` (int64, one per client) and ``sha256`` (uint8, 32 bytes per client)."""
    ids = sorted(index)
    digests = [list(bytes.fromhex(index[i])) for i in ids]
    return {
        "id": torch.tensor(ids, dtype=torch.int64),
        "sha256": torch.tensor(digests, dtype=torch.uint8).reshape(len(ids), _DIGEST_BYTES),
    }


def index_from_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[int, str]:
    """The index :func:`index_tensors` wrote.

    Raises:
        ValueError: The tensors are not such an index.
    """
    ids, digests = tensors["id"], tensors["sha256"]
    if (
        set(tensors) != {"id", "sha256"}
        or ids.dtype != torch.int64
        or digests.dtype != torch.uint8
        or ids.dim() != 1
        or tuple(digests.shape) != (ids.shape[0], _DIGEST_BYTES)
    ):
        raise ValueError("the client index has unexpected entries or shapes")
    raw = digests.numpy().tobytes()
    return {
        int(client_id): raw[i * _DIGEST_BYTES : (i + 1) * _DIGEST_BYTES].hex()
        for i, client_id in enumerate(ids.tolist())
    }


def remove_unreferenced(folder: Path, keep: Collection[str]) -> int:
    """Delete the state files in ``folder`` whose SHA-256 is not in ``keep`` (temporary files of
    writes under way are left alone).

    Returns:
        How many files were deleted.
    """
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        if path.suffix == _SUFFIX and path.stem not in keep:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _fsync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable (where the platform can)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
