"""Resuming a run: where it continues from (its config and newest readable checkpoint), and the
restoring of that checkpoint into a built experiment's model and method.

A run continues from its newest complete checkpoint; a damaged one (a power cut mid-write) is
skipped for the one before it. With a new total of rounds a run (finished or not) is extended:
it then ends as a run of that many rounds from the start would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fedssd import config as config_module
from fedssd.config import Config
from fedssd.errors import ConfigError, DataError
from fedssd.methods.protocol import Method
from fedssd.methods.server import load_server_state
from fedssd.runs.checkpoint import (
    Checkpoint,
    check_model_state,
    list_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    run_identity,
)
from fedssd.runs.outputs import SERVER_ONLY_SUMMARY, write_text_atomic
from fedssd.runs.resolve import load_config

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a run continues from (see :func:`resume_point`).

    Attributes:
        config: The config to continue with (``rounds`` and ``threads`` applied).
        stored: The run's own ``config.toml``.
        checkpoint: The newest readable checkpoint.
        path: Its folder.
        finished: Whether the run had finished (it is being extended).
    """

    config: Config
    stored: Config
    checkpoint: Checkpoint
    path: Path
    finished: bool


def resume_point(
    out_dir: Path, *, say: Log, rounds: int | None = None, threads: int | None = None
) -> ResumePoint:
    """The saved config of a run and its newest readable checkpoint; nothing is changed yet.

    Args:
        out_dir: The run folder.
        say: Progress lines (a skipped damaged checkpoint is reported).
        rounds: Extend the run to this many rounds in all (None: the run's own).
        threads: CPU threads for this process (None: the run's setting).

    Raises:
        fedssd.errors.FedSSDError: The folder is not a run with a checkpoint, the checkpoint is
            corrupted or belongs to another run, or ``rounds`` cannot be reached bit-identically.
    """
    config_path = out_dir / "config.toml"
    if not config_path.is_file():
        raise ConfigError(f"{out_dir} is not a fedssd run folder (it has no config.toml).")
    finished = (out_dir / "summary.json").exists()
    stored = load_config(config_path)
    if rounds is None and finished:
        raise ConfigError(
            f"the run in {out_dir} has finished (summary.json exists); nothing to resume "
            f"(add --rounds N, more than {stored.federation.rounds}, to continue it)."
        )
    cfg = stored
    if rounds is not None and rounds != stored.federation.rounds:
        if rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, not {rounds}.")
        if stored.federation.lr_schedule != "constant":
            raise ConfigError(
                f"the run in {out_dir} uses the {stored.federation.lr_schedule!r} learning-rate "
                "schedule, which depends on the total number of rounds, so it cannot be extended "
                "to equal a longer run; train a new run with federation.rounds set instead."
            )
        cfg = dataclasses.replace(
            stored, federation=dataclasses.replace(stored.federation, rounds=rounds)
        )
    if threads is not None:
        cfg = dataclasses.replace(cfg, threads=threads)
        config_module.validate(cfg)
    remove_partial_checkpoints(out_dir)
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        raise ConfigError(
            f"{out_dir} has no checkpoint to resume from (the run stopped before its first one, "
            f"written every {cfg.checkpoint.every} rounds); start it again with --overwrite."
        )
    saved, path = _newest_readable(checkpoints, say)
    if not same_run(saved.identity, cfg):
        raise DataError(
            f"checkpoint {path} was written by a different configuration than "
            f"{config_path}; resume only the run that wrote it."
        )
    total = cfg.federation.rounds
    if saved.rounds_done > total or (finished and saved.rounds_done == total):
        raise ConfigError(
            f"the run in {out_dir} has done {saved.rounds_done} rounds; pass --rounds N with N "
            f"greater than {saved.rounds_done} to continue it."
        )
    return ResumePoint(cfg, stored, saved, path, finished)


def restore_checkpoint(
    point: ResumePoint, *, model: nn.Module, method: Method, out_dir: Path, say: Log
) -> Checkpoint:
    """Load a checkpoint's global model into ``model`` and its server state into ``method``,
    then (only now that everything is checked) set a finished run's outputs aside and rewrite
    ``config.toml`` for an extension. The session that continues the run cuts its round logs
    back to the checkpoint's rounds (the rounds after it are redone).

    Returns:
        The checkpoint, its history as the run being continued records it.

    Raises:
        DataError: The checkpoint's model does not fit the run's.
    """
    cfg, stored, saved = point.config, point.stored, point.checkpoint
    check_model_state(model.state_dict(), saved.model, where=point.path)
    model.load_state_dict(saved.model)
    load_server_state(method, saved.server)
    if point.finished:
        _set_aside(out_dir, saved.rounds_done, say)
    total = cfg.federation.rounds
    if total != stored.federation.rounds:
        write_text_atomic(
            out_dir / "config.toml", config_module.dumps(_stored_threads(cfg, stored))
        )
        say(f"extending {out_dir} from {stored.federation.rounds} to {total} rounds")
    history = [_as_in_longer_run(record, cfg) for record in saved.history]
    saved = dataclasses.replace(saved, history=history)
    say(f"resuming {out_dir} after round {saved.rounds_done} of {total}")
    return saved


def same_run(identity: dict[str, Any], config: Config) -> bool:
    """Whether a checkpoint's run identity belongs to ``config``'s run.

    ``federation.rounds`` is left out under the constant learning-rate schedule, where the rounds
    done do not depend on the total, so that a run extended with ``--rounds`` still resumes from
    the checkpoints written before the extension.
    """
    expected = run_identity(config_module.to_dict(config))
    if config.federation.lr_schedule == "constant":
        expected = _without_rounds(expected)
        identity = _without_rounds(identity)
    return identity == expected


def _without_rounds(identity: dict[str, Any]) -> dict[str, Any]:
    federation = {k: v for k, v in dict(identity.get("federation", {})).items() if k != "rounds"}
    return {**identity, "federation": federation}


def _stored_threads(config: Config, stored: Config) -> Config:
    """``config`` with the run's own thread setting (``--threads`` applies to this process)."""
    return dataclasses.replace(config, threads=stored.threads)


def _as_in_longer_run(record: dict[str, Any], config: Config) -> dict[str, Any]:
    """A history record as a run of ``config``'s rounds has it: the kNN monitor also measures
    the last round of a shorter run, which a longer run skips unless it is an evaluation round."""
    done, every = int(record["round"]), config.evaluation.every
    if "knn_acc" in record and done != config.federation.rounds and (not every or done % every):
        return {k: v for k, v in record.items() if k != "knn_acc"}
    return record


def _set_aside(out_dir: Path, rounds_done: int, say: Log) -> None:
    """Move a finished run's final outputs to ``rounds-<R>/`` before it is extended."""
    target = out_dir / f"rounds-{rounds_done}"
    if target.exists():
        raise ConfigError(f"{target} already exists; move it away before extending the run.")
    names = (
        "summary.json",
        "model.safetensors",
        "server_state.safetensors",
        "eval",
        "columns.json",
        str(SERVER_ONLY_SUMMARY),
    )
    moved = [name for name in names if (out_dir / name).exists()]
    target.mkdir()
    for name in moved:
        (target / name).parent.mkdir(exist_ok=True)
        (out_dir / name).rename(target / name)
    say(f"the {rounds_done}-round run's {', '.join(moved)} moved to {target}")


def _newest_readable(checkpoints: Sequence[Path], say: Log) -> tuple[Checkpoint, Path]:
    """The newest checkpoint that passes verification; older ones are tried when a newer one is
    damaged (e.g. by a power cut), each skipped one reported.

    Raises:
        DataError: None of them can be read (the newest one's problem is reported).
    """
    first_error: DataError | None = None
    for path in reversed(checkpoints):
        try:
            saved = load_checkpoint(path)
        except DataError as error:
            first_error = first_error or error
            say(f"warning: {error} Trying the checkpoint before it.")
            continue
        return saved, path
    assert first_error is not None
    raise first_error
