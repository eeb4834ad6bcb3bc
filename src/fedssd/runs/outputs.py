"""Files a run writes: config.toml, metrics.jsonl, partition.json, summary.json, model.safetensors,
checkpoints/ and eval/.

Every file that is written whole goes through a temporary file and ``os.replace``, so an
interrupted write never leaves a truncated file behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedssd.errors import ConfigError

# A Flower run's key on the nodes (fedssd.flower.node_state), kept for a resumed run.
FLOWER_FILE = "flower.json"
# A DP run's server-only log: what each round's record holds beyond what may be published
# (cohort ids, sample counts, losses, failures, the raw unclipped fraction, timings).
SERVER_ONLY_LOG = Path("server_only") / "rounds.jsonl"
# And the summary entries it keeps to the server (per-client evaluation and failure counts).
SERVER_ONLY_SUMMARY = Path("server_only") / "summary.json"
RUN_FILES = (
    "config.toml",
    "metrics.jsonl",
    "partition.json",
    "summary.json",
    "model.safetensors",
    "server_state.safetensors",
    "checkpoints",
    "client-states",
    "eval",
    FLOWER_FILE,
)


def check_run_dir(path: Path, *, overwrite: bool) -> list[str]:
    """The run files already in ``path``; refuse them unless ``overwrite``. Creates nothing.

    Raises:
        ConfigError: ``path`` is a file, or holds run files and ``overwrite`` is false.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {path} exists and is not a folder; choose another --out.")
    existing = [name for name in RUN_FILES if (path / name).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"output folder {path} already holds a run ({existing[0]}); "
            "choose another --out or pass --overwrite."
        )
    return existing


def prepare_run_dir(path: Path, *, overwrite: bool) -> Path:
    """Create the output folder, refusing to mix a new run into an earlier one.

    Raises:
        ConfigError: As :func:`check_run_dir`, or the folder cannot be created.
    """
    existing = check_run_dir(path, overwrite=overwrite)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise ConfigError(f"cannot write to output folder {path}: {error.strerror}.") from None
    for name in existing:
        target = path / name
        # An earlier run's checkpoints must go too: resume would otherwise find them.
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    return path


def _temporary(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path``, with the permissions a plainly created file would get
    (mkstemp makes it private)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return fd, tmp


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    fd, tmp = _temporary(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write JSON (NaN and infinities become null, so that any JSON reader accepts the file)."""
    write_text_atomic(path, json.dumps(jsonable(data), indent=2) + "\n")


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it, so that a crash loses at most the line in progress."""
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(jsonable(record)) + "\n")
        handle.flush()


def save_model(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Save a state dict as safetensors through a temporary file."""
    fd, tmp = _temporary(path)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_path(path: str | Path, *, best_effort: bool = False) -> None:
    """Flush a written file, or a folder's entries, to disk, so that a rename after it never
    exposes an empty file (and a rename of it survives a power cut).

    Args:
        path: The file or folder.
        best_effort: Ignore an ``OSError`` from opening or syncing (folders, where a platform
            may not support it).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if best_effort:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not best_effort:
            raise
    finally:
        os.close(fd)


def jsonable(value: Any) -> Any:
    """Plain JSON data: non-finite floats become None, tuples lists, tensors numbers or lists."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):
        return jsonable(value.item())
    return value
