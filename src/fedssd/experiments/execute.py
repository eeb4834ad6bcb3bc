"""Running a sweep's planned runs that are still to do, and their extra evaluations.

:func:`execute` runs the missing runs into ``DIR/<setting>/<row>/seed-<s>/`` and rewrites
``DIR/results.csv`` and ``DIR/table.md`` after each.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedssd.experiments.executors import Executor, RunTask, SerialExecutor
from fedssd.experiments.grid import FAILED_FILE, SWEEP_FILE, Column, Grid, Log, Status
from fedssd.experiments.plan import PlannedRun, run_status
from fedssd.experiments.tables import write_outputs
from fedssd.runs.outputs import write_json
from fedssd.tracking import sweep_tracking


def execute(
    grid: Grid,
    out: Path,
    runs: Sequence[PlannedRun],
    *,
    log: Log | None,
    run_log: Log | None,
    executor: Executor | None = None,
) -> list[dict[str, Any]]:
    """Run (or finish) every run that is not done, then write the tables.

    Args:
        grid: The grid.
        out: The sweep folder.
        runs: From :func:`plan`.
        log: Receives the sweep's progress lines (run i/N, elapsed, time left).
        run_log: Receives each run's own progress lines (None for silence); an executor running
            runs elsewhere prints them on its own standard error instead.
        executor: Where the runs execute (:mod:`fedssd.experiments.executors`); None runs them
            here, one after another.

    Returns:
        The records of every finished run (as in results.csv). Runs that failed are listed in
        ``failed.json`` (and each one's error in its ``error.txt``); the others went on.
    """
    say: Log = log or (lambda _message: None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SWEEP_FILE, sweep_description(grid))
    started = time.perf_counter()
    trained_seconds: list[float] = []
    total = len(runs)
    tasks: list[RunTask] = []
    statuses: dict[int, Status] = {}
    configs = sweep_tracking(
        grid.title, out, [(run.config, f"{run.setting}/{run.row}/seed-{run.seed}") for run in runs]
    )
    for index, run in enumerate(runs, start=1):
        status = run_status(run, grid.columns)
        label = f"{run.setting}/{run.row}/seed-{run.seed}"
        if status == "done":
            say(f"[sweep] run {index}/{total} {label}: finished earlier, skipped")
            continue
        statuses[index] = status
        tasks.append(
            RunTask(
                index=index,
                label=label,
                config=configs[index - 1],
                run_dir=run.run_dir,
                train=status in ("resume", "restart", "new"),
                resume=status == "resume",
                columns=tuple(grid.columns),
                verbose=run_log is not None,
            )
        )
    executor = executor or SerialExecutor(run_log)
    words = {
        "evaluate": "extra evaluations",
        "resume": "resuming from its newest checkpoint",
        "restart": "restarting",
        "new": "starting",
    }

    def on_start(task: RunTask, queued: bool) -> None:
        what = words[statuses[task.index]]
        if queued:
            say(f"[sweep] run {task.index}/{total} {task.label}: queued ({what})")
            return
        say(
            f"[sweep] run {task.index}/{total} {task.label}: {what}"
            f" | elapsed {_duration(time.perf_counter() - started)} | left "
            + _eta(trained_seconds, runs[task.index - 1 :], grid.columns)
        )

    failures: dict[int, str] = {}
    for finished, outcome in enumerate(executor.run(tasks, on_start), start=1):
        run = runs[outcome.index - 1]
        label = f"{run.setting}/{run.row}/seed-{run.seed}"
        elapsed = time.perf_counter() - started
        progress = f"{finished}/{len(tasks)} of this sweep done"
        left = _duration(elapsed / finished * (len(tasks) - finished))
        if outcome.not_resumed is not None:
            say(
                f"[sweep] run {outcome.index}/{total} {label}: could not be resumed "
                f"({outcome.not_resumed}); it was trained again from the start"
            )
        if outcome.error is not None:
            failures[outcome.index] = outcome.error
            say(
                f"[sweep] run {outcome.index}/{total} {label}: FAILED ({outcome.error}); "
                f"the others go on | {progress} | elapsed {_duration(elapsed)} | left {left}"
            )
        else:
            trained_seconds.append(outcome.seconds)
            say(
                f"[sweep] run {outcome.index}/{total} {label}: done in "
                f"{_duration(outcome.seconds)} | {progress} | elapsed {_duration(elapsed)}"
                f" | left {left}"
            )
        write_outputs(grid, out, runs)
    _write_failures(out, runs, failures)
    records = write_outputs(grid, out, runs)
    if failures:
        say(
            f"[sweep] {len(failures)} of {len(tasks)} runs failed (listed in {out}/failed.json, "
            f"each error in its run's error.txt); run the sweep again to retry them"
        )
    say(f"[sweep] {total} runs complete in {_duration(time.perf_counter() - started)}: {out}")
    return records


def _write_failures(out: Path, runs: Sequence[PlannedRun], failures: Mapping[int, str]) -> None:
    """``failed.json``: the runs that failed in the last execution, with their errors (removed
    when none failed)."""
    path = out / FAILED_FILE
    if not failures:
        path.unlink(missing_ok=True)
        return
    write_json(
        path,
        [
            {
                "setting": runs[i - 1].setting,
                "row": runs[i - 1].row,
                "seed": runs[i - 1].seed,
                "run_dir": str(runs[i - 1].run_dir),
                "error": error,
            }
            for i, error in sorted(failures.items())
        ],
    )


def _prefixed(log: Log | None, prefix: str) -> Log | None:
    """``log`` with every line prefixed (None stays None)."""
    if log is None:
        return None
    target = log

    def say(message: str) -> None:
        target(prefix + message)

    return say


def _eta(seconds: Sequence[float], left: Sequence[PlannedRun], columns: Sequence[Column]) -> str:
    """Time left: the runs still to do times the mean duration of the runs done so far."""
    todo = sum(1 for run in left if run_status(run, columns) != "done")
    if not seconds:
        return "unknown (no run timed yet)"
    return _duration(todo * sum(seconds) / len(seconds))


def _duration(seconds: float) -> str:
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def sweep_description(grid: Grid) -> dict[str, Any]:
    """What ``sweep.json`` records: the grid's structure, for the report."""
    return {
        "title": grid.title,
        "grid": str(grid.path),
        "base": str(grid.base),
        "seeds": list(grid.seeds),
        "settings": [s.name for s in grid.settings],
        "rows": [{"name": r.name, "method": r.method} for r in grid.rows],
        "columns": [c.spec for c in grid.columns],
        "baseline": grid.baseline,
    }
