"""Where a grid's runs execute: in this process one after another, in local worker processes,
on a Slurm cluster through submitit, or on a Ray cluster.

:mod:`fedssd.experiments` plans the runs and writes the tables; it hands each run still to do to an
:class:`Executor` as a :class:`RunTask` (plain, picklable data) and gets a :class:`TaskOutcome`
back as each finishes, in whatever order they finish. The work of one task is
:func:`run_task`: train the run (unless it only lacks extra evaluations), then its extra
evaluations. A task that fails is recorded (its error in ``<run>/error.txt``) and the others go
on; a finished run is recognised by its ``summary.json`` whichever worker wrote it, so a grid
resumes the same way whatever executed it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from fedssd import api
from fedssd.config import Config
from fedssd.errors import ConfigError, FedSSDError
from fedssd.experiments.evaluate import evaluate_run
from fedssd.experiments.grid import COLUMNS_FILE, Column
from fedssd.experiments.plan import read_columns
from fedssd.runs.outputs import write_json
from fedssd.runs.resume import resume_point

Log = Callable[[str], None]
EXECUTORS = ("local", "submitit", "ray")
ERROR_FILE = "error.txt"


@dataclasses.dataclass(frozen=True)
class RunTask:
    """One run of a grid to execute.

    Attributes:
        index: 1-based position in the grid (for progress lines).
        label: ``<setting>/<row>/seed-<s>``.
        config: The run's resolved config.
        run_dir: Its folder.
        train: Train it (False: it is trained, only extra evaluations are missing).
        resume: Train on from its newest checkpoint (an interrupted run of this config).
        columns: The grid's columns (:class:`fedssd.experiments.grid.Column`); extra
            evaluations run.
        threads: Torch CPU threads for the run (None: leave the process's setting).
        verbose: The worker prints the run's own progress lines (prefixed) on standard error.
    """

    index: int
    label: str
    config: Config
    run_dir: Path
    train: bool
    columns: tuple[Column, ...]
    resume: bool = False
    threads: int | None = None
    verbose: bool = False


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """What came back from one task: its index, its duration, its error (None: success) and
    why an interrupted run could not be resumed (None: it was, or there was none)."""

    index: int
    seconds: float
    error: str | None = None
    not_resumed: str | None = None


OnStart = Callable[["RunTask", bool], None]
"""Told ``(task, queued)`` when a task starts (False) or is handed to a queue (True)."""


class Executor(Protocol):
    """Runs tasks and yields their outcomes as they finish (in any order)."""

    def run(self, tasks: Sequence[RunTask], on_start: OnStart) -> Iterator[TaskOutcome]:
        """Execute every task (telling ``on_start`` when each starts or is queued); yield one
        outcome per task."""
        ...


def run_task(task: RunTask, log: Log | None = None) -> TaskOutcome:
    """Train a run (if needed) and compute its extra evaluations; never raises for a failed run.

    Args:
        task: The run.
        log: Receives the run's own progress lines; None uses standard error when
            ``task.verbose``, else silence.

    Returns:
        The outcome; a failure's message (one line, the exception's class and sentence) is also
        written to ``<run>/error.txt`` with its traceback.
    """
    import torch

    if task.threads is not None:
        torch.set_num_threads(task.threads)
    if log is None and task.verbose:
        log = _prefixed(api.stderr_log, f"[{task.index} {task.label}] ")
    begun = time.perf_counter()
    error_file = task.run_dir / ERROR_FILE
    not_resumed = None
    try:
        if task.train:
            # Extra evaluations of an earlier model must not survive.
            (task.run_dir / COLUMNS_FILE).unlink(missing_ok=True)
            if task.resume:
                not_resumed = _resume(task, log)
            if not task.resume or not_resumed is not None:
                # A new run, or an interrupted one that cannot go on: its files are replaced.
                api.train(task.config, out=task.run_dir, overwrite=True, log=log)
        evaluate_columns(task.run_dir, task.columns, log=log)
    except Exception as error:  # a failed run is recorded, the grid goes on
        message = f"{type(error).__name__}: {_one_line(error)}"
        try:
            task.run_dir.mkdir(parents=True, exist_ok=True)
            text = message + "\n\n" + "".join(traceback.format_exception(error))
            error_file.write_text(text, encoding="utf-8")
        except OSError:
            pass  # the outcome still carries the message
        return TaskOutcome(task.index, time.perf_counter() - begun, message, not_resumed)
    error_file.unlink(missing_ok=True)
    return TaskOutcome(task.index, time.perf_counter() - begun, not_resumed=not_resumed)


def _resume(task: RunTask, log: Log | None) -> str | None:
    """Train an interrupted run on from its newest checkpoint, as ``fedssd train --resume``
    does (on the CPU it then ends as the run would have without the interruption, at the same
    thread count). Returns None, or why it cannot be resumed (no readable checkpoint, one of
    another config), in which case nothing was trained and the caller starts it again."""
    say: Log = log or (lambda _message: None)
    try:
        point = resume_point(task.run_dir, threads=task.config.threads, say=say)
    except FedSSDError as error:
        reason = _one_line(error)
        if log is not None:
            log(f"cannot resume it ({reason}); training it again from the start")
        return reason
    api.resume_at(point, task.run_dir, log=log)
    return None


def _one_line(error: BaseException) -> str:
    """An error's message on one line (its whitespace runs made single spaces)."""
    return " ".join(str(error).split())


def evaluate_columns(run_dir: Path, columns: Sequence[Column], *, log: Log | None) -> None:
    """Compute the missing extra evaluations of a trained run into its columns.json."""
    have = read_columns(run_dir)
    for column in columns:
        if column.protocol is None or column.evaluation in have:
            continue
        # log=None is silence (sweep --quiet); evaluate_run's own default would print.
        result = evaluate_run(
            run_dir, column.protocol, labels=column.labels, eval_data=column.eval_data, log=log
        )
        have[column.evaluation] = result
        # Written after each evaluation, so that an interruption loses at most the one running.
        write_json(run_dir / COLUMNS_FILE, have)


def _prefixed(log: Log, prefix: str) -> Log:
    def say(message: str) -> None:
        log(prefix + message)

    return say


class SerialExecutor:
    """Today's behaviour: every run in this process, one after another."""

    def __init__(self, run_log: Log | None = None) -> None:
        self.run_log = run_log

    def run(self, tasks: Sequence[RunTask], on_start: OnStart) -> Iterator[TaskOutcome]:
        """Run each task in turn."""
        for task in tasks:
            on_start(task, False)
            log = None if self.run_log is None else _prefixed(self.run_log, _prefix(task))
            yield run_task(task, log)


def _prefix(task: RunTask) -> str:
    return f"[{task.index} {task.label}] "


def cpu_count() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """Each of ``jobs`` simultaneous runs gets an equal share of the cores (at least one)."""
    return max(1, (cores or cpu_count()) // max(1, jobs))


def _init_worker(slots: Any, devices: Sequence[str], threads: int) -> None:
    """Pin a fresh worker process to its share of CPU threads and to one GPU of ``devices``.

    The GPU is chosen through ``CUDA_VISIBLE_DEVICES`` before CUDA starts in the worker, so the
    run's config (``device = "auto"`` or ``"cuda"``) is unchanged and a finished run matches
    its grid whichever GPU ran it.
    """
    import torch

    slot = int(slots.get())
    if devices:
        device = devices[slot % len(devices)]
        os.environ["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] or "0"
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(max(1, threads))


def parse_devices(text: str | None) -> tuple[str, ...]:
    """``cuda:0,cuda:1`` as a tuple; refuses anything but ``cuda:N`` entries.

    Raises:
        ConfigError: An entry is not ``cuda:N`` or repeats.
    """
    if not text:
        return ()
    devices = tuple(part.strip() for part in text.split(",") if part.strip())
    for device in devices:
        prefix, _, index = device.partition(":")
        if prefix != "cuda" or not index.isdigit():
            raise ConfigError(
                f"--devices takes cuda:N entries separated by commas, not {device!r}."
            )
    if len(set(devices)) != len(devices):
        raise ConfigError("--devices names a GPU twice; list each GPU once.")
    return devices


class ProcessExecutor:
    """``jobs`` local worker processes (spawned, so each starts its own torch), each pinned to
    ``cores // jobs`` CPU threads and, with ``devices``, to one GPU (workers take the GPUs in
    turn)."""

    def __init__(
        self, jobs: int, *, devices: Sequence[str] = (), threads: int | None = None
    ) -> None:
        if jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, not {jobs}.")
        self.jobs = jobs
        self.devices = tuple(devices)
        self.threads = threads or threads_per_job(jobs)

    def run(self, tasks: Sequence[RunTask], on_start: OnStart) -> Iterator[TaskOutcome]:
        """Submit every task to the pool; yield outcomes as they complete."""
        if not tasks:
            return
        context = multiprocessing.get_context("spawn")
        manager = context.Manager()
        try:
            slots = manager.Queue()
            for slot in range(self.jobs):
                slots.put(slot)
            with concurrent.futures.ProcessPoolExecutor(
                max_workers=min(self.jobs, len(tasks)),
                mp_context=context,
                initializer=_init_worker,
                initargs=(slots, self.devices, self.threads),
            ) as pool:
                futures = {}
                for task in tasks:
                    futures[pool.submit(run_task, dataclasses.replace(task, threads=None))] = task
                    on_start(task, True)
                try:
                    for future in concurrent.futures.as_completed(futures):
                        yield _outcome(future, futures[future])
                except BaseException:
                    # Interrupted: runs not started are dropped; running ones stop with the
                    # workers (they share the terminal's Ctrl-C) and are redone on resume.
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        finally:
            manager.shutdown()


def _outcome(future: concurrent.futures.Future[TaskOutcome], task: RunTask) -> TaskOutcome:
    """A finished future's outcome; a worker that died (killed, out of memory) is a failure."""
    try:
        return future.result()
    except Exception as error:  # the worker itself failed; record it
        return TaskOutcome(task.index, 0.0, f"{type(error).__name__}: worker failed ({error})")


class SubmititExecutor:
    """One submitit job per run: Slurm (``cluster = "slurm"``), or submitit's local executor
    (``cluster = "local"``, which runs jobs as local processes; used by the tests).

    Args:
        folder: Where submitit keeps its job files (logs, pickles).
        cluster: ``slurm``, ``local`` or None (submitit's auto-detection).
        jobs: How many jobs may run at once (Slurm array parallelism).
        threads: CPU threads per run (Slurm ``cpus_per_task``).
        parameters: Further executor parameters (``timeout_min``, ``slurm_partition``,
            ``gpus_per_node``, ...), passed to ``update_parameters``.
        poll: Seconds between checks of the jobs' states.
    """

    def __init__(
        self,
        folder: Path,
        *,
        cluster: str | None = None,
        jobs: int = 1,
        threads: int = 1,
        parameters: Mapping[str, Any] | None = None,
        poll: float = 1.0,
    ) -> None:
        submitit = require("submitit", "submitit")
        self.poll = poll
        self.threads = threads
        if cluster == "local":
            self.executor = submitit.LocalExecutor(folder=str(folder))
            self.executor.update_parameters(
                timeout_min=int((parameters or {}).get("timeout_min", 60 * 24))
            )
        else:
            self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
            options: dict[str, Any] = {"cpus_per_task": threads, "slurm_array_parallelism": jobs}
            options.update(parameters or {})
            try:
                self.executor.update_parameters(**options)
            except (ValueError, TypeError) as error:
                raise ConfigError(f"submitit refused the executor parameters: {error}.") from None

    def run(self, tasks: Sequence[RunTask], on_start: OnStart) -> Iterator[TaskOutcome]:
        """Submit every task as a job; yield outcomes as the jobs end."""
        pending = {}
        for task in tasks:
            job = self.executor.submit(run_task, dataclasses.replace(task, threads=self.threads))
            pending[job] = task
            on_start(task, True)
        while pending:
            for job in [j for j in pending if j.done()]:
                task = pending.pop(job)
                try:
                    yield job.result()
                except Exception as error:  # the job itself failed; record it
                    first = _one_line(error)[:300]
                    yield TaskOutcome(
                        task.index, 0.0, f"{type(error).__name__}: job failed ({first})"
                    )
            if pending:
                time.sleep(self.poll)


class RayExecutor:
    """One Ray task per run on a Ray cluster (``address``; None starts or joins a local one),
    each reserving ``threads`` CPUs and, with ``gpus``, that many GPUs."""

    def __init__(self, *, address: str | None = None, threads: int = 1, gpus: float = 0.0) -> None:
        self.ray = require("ray", "ray")
        self.address = address
        self.threads = threads
        self.gpus = gpus

    def run(self, tasks: Sequence[RunTask], on_start: OnStart) -> Iterator[TaskOutcome]:
        """Submit every task; yield outcomes as they complete."""
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=True)
        remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus, max_retries=0)(run_task)
        pending = {}
        for task in tasks:
            pending[remote.remote(dataclasses.replace(task, threads=self.threads))] = task
            on_start(task, True)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as error:  # the Ray task itself failed
                    first = _one_line(error)[:300]
                    yield TaskOutcome(
                        task.index, 0.0, f"{type(error).__name__}: task failed ({first})"
                    )


def require(module: str, extra: str) -> Any:
    """Import an optional engine, or say in one sentence which extra installs it.

    Raises:
        ConfigError: The package is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"this needs the {module} package; install it with pip install 'fedssd[{extra}]'."
        ) from None


def make_executor(
    name: str,
    *,
    jobs: int,
    devices: Sequence[str] = (),
    run_log: Log | None = None,
    folder: Path,
    cluster: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    address: str | None = None,
) -> Executor:
    """The executor a ``fedssd sweep`` command line asks for.

    Args:
        name: ``local`` (this machine: serial for one job, else worker processes), ``submitit``
            or ``ray``.
        jobs: Runs at once.
        devices: GPUs to spread local workers over (one each).
        run_log: The serial executor's per-run log (None: silence).
        folder: submitit's job folder.
        cluster: submitit's cluster (``slurm``, ``local``; None: auto).
        parameters: submitit's executor parameters.
        address: Ray's cluster address.

    Raises:
        ConfigError: An unknown name, or the engine is not installed.
    """
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}; choose one of {', '.join(EXECUTORS)}.")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, not {jobs}.")
    threads = threads_per_job(jobs)
    if name == "submitit":
        return SubmititExecutor(
            folder, cluster=cluster, jobs=jobs, threads=threads, parameters=parameters
        )
    if name == "ray":
        return RayExecutor(address=address, threads=threads, gpus=1.0 if devices else 0.0)
    if jobs == 1 and not devices:
        return SerialExecutor(run_log)
    return ProcessExecutor(jobs, devices=devices, threads=threads)


__all__ = [
    "EXECUTORS",
    "Executor",
    "ProcessExecutor",
    "RayExecutor",
    "RunTask",
    "SerialExecutor",
    "SubmititExecutor",
    "TaskOutcome",
    "make_executor",
    "run_task",
]
