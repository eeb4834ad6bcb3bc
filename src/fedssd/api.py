"""The calls that run an experiment: :func:`train` and :func:`resume`.

They compose the parts: the config (:mod:`fedssd.runs.resolve`), the experiment and its session
(:mod:`fedssd.experiment`: data, partition, model, method, simulator, evaluation) and the run
folder (:mod:`fedssd.runs`). The CLI is a thin layer over them.

Example:
    >>> import fedssd
    >>> result = fedssd.train("smoke", overrides=["federation.rounds=2"], out="runs/x")
    >>> result.summary["knn_acc"]  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedssd.config import Config
from fedssd.experiment import (
    RunResult,
    build_experiment,
    check_setup,
    simulate,
    warm_start,
    write_header,
)
from fedssd.runs.outputs import check_run_dir, prepare_run_dir
from fedssd.runs.resolve import load_config
from fedssd.runs.resume import ResumePoint, restore_checkpoint, resume_point

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    """Progress to standard error (standard output is left for results)."""
    print(message, file=sys.stderr, flush=True)


def train(
    config: Config | str | Path,
    *,
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    overwrite: bool = False,
    log: Log | None = stderr_log,
    verbose: bool = False,
) -> RunResult:
    """Run one federated experiment, evaluate the final global model and write the run's files.

    Args:
        config: A :class:`~fedssd.config.Config` or the path of a TOML file.
        overrides: ``dotted.key=value`` strings applied on top (e.g. ``"federation.rounds=5"``).
        out: Folder for ``config.toml``, ``metrics.jsonl``, ``partition.json``, ``summary.json``,
            ``model.safetensors`` and ``checkpoints/``; None writes nothing.
        overwrite: Replace the files of an earlier run in ``out`` (otherwise that is an error).
        log: Receives progress lines; None for silence.
        verbose: Also log a line after each client's local training.

    Returns:
        The resolved config, per-round history, final summary and the trained model.

    Raises:
        fedssd.errors.FedSSDError: A user-caused problem (config, data), in one sentence.
    """
    started = time.perf_counter()
    say: Log = log or (lambda _message: None)
    cfg = load_config(config, overrides=overrides)
    if out is not None:
        check_run_dir(Path(out), overwrite=overwrite)
    check_setup(cfg)
    experiment = build_experiment(cfg, log=say)
    warm_start(experiment, log=say)
    # Everything the user can get wrong has been checked: only now is the output folder touched.
    out_dir = prepare_run_dir(Path(out), overwrite=overwrite) if out is not None else None
    if out_dir is not None:
        write_header(out_dir, cfg, experiment.data)
    return simulate(
        experiment, out_dir=out_dir, resume_from=None, started=started, say=say, verbose=verbose
    )


def resume(
    run_dir: str | Path,
    *,
    rounds: int | None = None,
    threads: int | None = None,
    log: Log | None = stderr_log,
    verbose: bool = False,
) -> RunResult:
    """Continue an interrupted run from its newest checkpoint, or extend a run to more rounds.

    The run's own ``config.toml`` is used. On the CPU, a resumed run ends with the same global
    weights, bit for bit, and the same metrics as the run would have without the interruption
    (with the same thread count). With ``rounds``, the run (finished or not) continues to that
    many rounds in all and ends as a run of that many rounds from the start would; the outputs of
    a finished run's shorter version are moved to ``<run>/rounds-<R>/`` first.

    Args:
        run_dir: The run folder.
        rounds: The total number of rounds to continue to (None: the run's own).
        threads: CPU threads for this process (None: the run's ``threads`` setting).
        log: Receives progress lines; None for silence.
        verbose: Also log a line after each client's local training.

    Raises:
        fedssd.errors.FedSSDError: The folder is not a run with a checkpoint, the checkpoint is
            corrupted or belongs to another run, or ``rounds`` cannot be reached bit-identically.
    """
    started = time.perf_counter()
    say: Log = log or (lambda _message: None)
    point = resume_point(Path(run_dir), rounds=rounds, threads=threads, say=say)
    return resume_at(point, Path(run_dir), log=log, verbose=verbose, started=started)


def resume_at(
    point: ResumePoint,
    run_dir: str | Path,
    *,
    log: Log | None = stderr_log,
    verbose: bool = False,
    started: float | None = None,
) -> RunResult:
    """:func:`resume` from a resume point already found
    (:func:`fedssd.runs.resume.resume_point` of ``run_dir``).

    Args:
        started: When the work began (``time.perf_counter()``; None: now), for the run's times.
    """
    started = time.perf_counter() if started is None else started
    say: Log = log or (lambda _message: None)
    out_dir = Path(run_dir)
    check_setup(point.config, history=point.checkpoint.history)
    experiment = build_experiment(point.config, log=say)
    saved = restore_checkpoint(
        point, model=experiment.global_model, method=experiment.method, out_dir=out_dir, say=say
    )
    return simulate(
        experiment, out_dir=out_dir, resume_from=saved, started=started, say=say, verbose=verbose
    )


__all__ = ["resume", "resume_at", "stderr_log", "train"]
