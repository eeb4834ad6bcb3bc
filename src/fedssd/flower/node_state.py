"""A SuperNode's per-client state on its own disk, so that a restarted node keeps it.

Flower keeps a node's ``Context.state`` in the SuperNode's memory: a SuperNode that is killed
and started again has lost it, and so would a client's target network, predictor or FedEMA's
lambda. With ``state-dir`` in its node config, a node also writes what its client keeps after
each round it trained in to::

    <state-dir>/<run key>/client-<K>/checkpoints/round-NNNNNN/

in the format of the run checkpoints (:mod:`fedssd.runs.checkpoint`: safetensors and
JSON, written under a temporary name, fsynced and renamed, every file's SHA-256 checked on
reading, nothing unpickled): the state itself is one file in
``<state-dir>/<run key>/client-<K>/client-states/``, named by its SHA-256, and each
version's folder holds its index. ``NNNNNN`` is the number of rounds done when it was written (the
round index + 1).

Before training in round ``t``, the node loads the newest version written before round ``t``
(``rounds done <= t``), not simply the newest: when the server resumes from a checkpoint older
than the node's last round, the client starts that round from the state it had then, so the
resumed run ends with the uninterrupted run's weights. Versions are therefore kept back to the
oldest round a server checkpoint can return to (``checkpoint.every * checkpoint.keep`` rounds
back), the newest one at or before that included.

The run key comes from the server (``records.TASK["run-key"]``): it names the server's run, so a
new run never picks up an old run's state, while a resumed run (same run folder) finds it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from fedssd.errors import ConfigError
from fedssd.methods.protocol import ClientState
from fedssd.runs.checkpoint import (
    FOLDER,
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_unreferenced_states,
    save_checkpoint,
)
from fedssd.runs.store import ClientStore

_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def client_folder(state_dir: Path, run_key: str, client_id: int) -> Path:
    """Where client ``client_id``'s state of run ``run_key`` lives under ``state_dir``.

    Raises:
        ConfigError: The run key is not a plain name (it becomes a folder name).
    """
    if not _KEY.match(run_key) or run_key in {".", ".."}:
        raise ConfigError(f"the server sent an unusable run key {run_key!r}.")
    return state_dir / run_key / f"client-{client_id}"


def load_client_state(
    state_dir: Path, run_key: str, client_id: int, *, round_index: int
) -> ClientState | None:
    """The state client ``client_id`` kept before round ``round_index``, or None if it has not
    trained in this run before that round.

    Raises:
        DataError: That version's files are corrupted or truncated (one sentence naming them).
    """
    folder = client_folder(state_dir, run_key, client_id)
    usable = [p for p in list_checkpoints(folder) if _rounds_done(p) <= round_index]
    if not usable:
        return None
    return load_checkpoint(usable[-1]).store.get(client_id)


def save_client_state(
    state_dir: Path,
    run_key: str,
    client_id: int,
    kept: ClientState,
    *,
    round_index: int,
    horizon: int,
) -> Path:
    """Write what client ``client_id`` keeps after training in ``round_index``, atomically, and
    delete the versions no resume can need any more.

    Args:
        state_dir: The node's ``state-dir``.
        run_key: The server's run key.
        client_id: The client this node plays.
        kept: Its state after the round.
        round_index: The round it trained in.
        horizon: How many rounds back a resumed server can start from
            (``checkpoint.every * checkpoint.keep``; 0 when the server writes no checkpoints).

    Returns:
        The version's folder.
    """
    folder = client_folder(state_dir, run_key, client_id)
    folder.mkdir(parents=True, exist_ok=True)
    store = ClientStore()
    store.put(client_id, kept)
    checkpoint = Checkpoint(
        rounds_done=round_index + 1,
        model={},
        server={},
        store=store,
        history=[],
        identity={"run-key": run_key, "client-id": client_id},
    )
    try:
        written = save_checkpoint(folder, checkpoint, keep=1 << 30)
    except OSError:
        # Another process wrote the same round at the same moment (a task of a server that died,
        # redone by the resumed server: both hold the same state). Keep the version that won.
        written = folder / FOLDER / f"round-{round_index + 1:06d}"
        for partial in (folder / FOLDER).glob(f".tmp-{written.name}-{os.getpid()}"):
            shutil.rmtree(partial, ignore_errors=True)
        load_checkpoint(written)
    # A resume can start after `earliest` rounds done at the earliest; it loads the newest
    # version at or before it, and every version after it may be loaded later.
    earliest = round_index + 1 - horizon
    at_or_before = [p for p in list_checkpoints(folder) if _rounds_done(p) <= earliest]
    for stale in at_or_before[:-1]:
        shutil.rmtree(stale, ignore_errors=True)
    remove_unreferenced_states(folder)
    return written


def _rounds_done(path: Path) -> int:
    return int(path.name.removeprefix("round-"))


__all__ = ["client_folder", "load_client_state", "save_client_state"]
