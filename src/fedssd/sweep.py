"""Grids of runs: settings x method rows x seeds, run one after another, and their tables.

A grid file (TOML) names a base config, the seeds, the settings (e.g. cross-silo and cross-device,
each a list of ``key=value`` overrides), the rows (a method plus overrides, e.g. SSD without DSR)
and the evaluations that form the table's columns. :func:`plan` checks every run's config before
anything runs; :func:`execute` runs the missing ones into ``DIR/<setting>/<row>/seed-<s>/`` and
rewrites ``DIR/results.csv`` and ``DIR/table.md`` after each. docs/sweeps.md describes the format.

The table maths (:func:`summarize`, :func:`paired_difference`, :func:`render_table`) are pure
functions of the per-run records, so they can be checked without training.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

from fedssd import config as config_module
from fedssd.config import Config
from fedssd.errors import ConfigError, FedSSDError

if TYPE_CHECKING:
    from fedssd.executors import Executor

Log = Callable[[str], None]
Status = Literal["done", "evaluate", "restart", "new"]

GRID_KEYS = ("base", "title", "seeds", "overrides", "settings", "rows", "columns", "baseline")
SETTING_KEYS = ("name", "overrides")
ROW_KEYS = ("name", "method", "overrides")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]*")
COLUMNS_FILE = "columns.json"
SWEEP_FILE = "sweep.json"
FAILED_FILE = "failed.json"

# Summary metrics a column may name: key -> (title, shown in %, higher is better; None = no bold).
SUMMARY_METRICS: dict[str, tuple[str, bool, bool | None]] = {
    "linear_probe_acc": ("LP", True, True),
    "knn_acc": ("kNN", True, True),
    "linear_probe_train_acc": ("LP train", True, True),
    "uniformity_global": ("-L_unif", False, True),
    "uniformity_inter_mean": ("-L_unif inter", False, True),
    "uniformity_intra_mean": ("-L_unif intra", False, True),
    "alignment": ("L_align", False, False),
    "effective_rank": ("eff. rank", False, True),
    "uniformity_global_z": ("-L_unif (z)", False, True),
    "uniformity_inter_mean_z": ("-L_unif inter (z)", False, True),
    "uniformity_intra_mean_z": ("-L_unif intra (z)", False, True),
    "alignment_z": ("L_align (z)", False, False),
    "effective_rank_z": ("eff. rank (z)", False, True),
    "train_seconds": ("train s", False, None),
    "wall_seconds": ("wall s", False, None),
}
ALWAYS_COLUMNS = ("linear_probe_acc", "knn_acc")
# Keys of an evaluate_run result taken as the column's value, first present wins (the paper
# reports the best periodic test accuracy of fine-tuning); "protocol@key" names one explicitly.
HEADLINE_KEYS = ("finetune_best_acc", "linear_probe_acc", "knn_acc", "best_acc", "acc")


@dataclasses.dataclass(frozen=True)
class Setting:
    """A column group of the table, e.g. cross-silo: a name and overrides for all its runs."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Row:
    """A row of the table: a method and its overrides (e.g. ``+PD`` = ssd, ``method.dsr=false``)."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Column:
    """One evaluation shown per setting.

    Attributes:
        spec: As written in the grid: a summary key (``knn_acc``), ``finetune:<fraction>`` or
            ``linear-on:<dataset>``, optionally followed by ``@<result key>``.
        title: Header text.
        percent: Values are fractions shown as percentages.
        higher_is_better: Direction of the bold best mean; None marks nothing.
        protocol: For an extra evaluation, the ``evaluate_run`` protocol (else None).
        labels: Labelled fraction for ``finetune``.
        eval_data: Dataset for ``linear-on``.
        result_key: Key of the ``evaluate_run`` result to show (None = first of HEADLINE_KEYS).
    """

    spec: str
    title: str
    percent: bool
    higher_is_better: bool | None
    protocol: str | None = None
    labels: float | None = None
    eval_data: str | None = None
    result_key: str | None = None

    @property
    def evaluation(self) -> str:
        """The evaluation behind the column (its spec without ``@key``): columns that differ
        only in the key they show share one evaluation."""
        return self.spec.partition("@")[0]


@dataclasses.dataclass(frozen=True)
class Grid:
    """A parsed grid file (see docs/sweeps.md)."""

    path: Path
    base: Path
    title: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    settings: tuple[Setting, ...]
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    baseline: str | None


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a grid, with its fully resolved config and folder."""

    setting: str
    row: str
    method: str
    seed: int
    config: Config
    run_dir: Path


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (ddof = 1; NaN for fewer than two values)."""

    mean: float
    std: float
    n: int


@dataclasses.dataclass(frozen=True)
class Paired:
    """Paired differences ``row - baseline`` on the seeds both have.

    Attributes:
        differences: Seed -> difference, in seed order.
        stat: Mean and sample std of the differences.
        within_spread: ``|mean| <= std`` (False when the std is undefined).
    """

    differences: dict[int, float]
    stat: Stat
    within_spread: bool


# ----------------------------------------------------------------------------- grid parsing


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> Grid:
    """Read and check a grid file's structure (the configs are checked by :func:`plan`).

    Args:
        path: The grid TOML file.
        overrides: Extra ``key=value`` overrides for every run (the command's ``--set``).

    Raises:
        ConfigError: The file is missing or malformed, in one sentence.
    """
    path = Path(path)
    raw = config_module.read_toml(path)
    where = f"grid {path.name}"
    _no_unknown(raw, GRID_KEYS, where)
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f'{where} needs base = "<config file>", a path relative to the grid.')
    seeds = raw.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise ConfigError(f"{where}: seeds must be a non-empty list of non-negative integers.")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds must not repeat a value.")
    title = raw.get("title", path.stem)
    if not isinstance(title, str):
        raise ConfigError(f"{where}: title must be a string.")
    common = (*_overrides(raw.get("overrides", []), where), *overrides)
    for item in common:
        _check_override(item, where, allow_method=False)
    settings = tuple(_setting(s, where) for s in _tables(raw.get("settings"), "settings", where))
    if not settings:
        settings = (Setting(name="default"),)
    rows = tuple(_row(r, where) for r in _tables(raw.get("rows"), "rows", where))
    if not rows:
        raise ConfigError(f"{where} needs at least one [[rows]] table (name, method, overrides).")
    for kind, names in (("setting", [s.name for s in settings]), ("row", [r.name for r in rows])):
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"{where}: {kind} name {repeated[0]!r} is used twice.")
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in [r.name for r in rows]:
        raise ConfigError(f"{where}: baseline {baseline!r} is not the name of one of its rows.")
    specs = raw.get("columns", [])
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ConfigError(f'{where}: columns must be a list of strings (e.g. "finetune:0.01").')
    columns = tuple(parse_column(s) for s in dict.fromkeys([*ALWAYS_COLUMNS, *specs]))
    return Grid(
        path=path,
        base=(path.parent / base),
        title=title,
        seeds=tuple(seeds),
        overrides=common,
        settings=settings,
        rows=rows,
        columns=columns,
        baseline=baseline,
    )


def parse_column(spec: str) -> Column:
    """A column from its grid text: a summary key, ``finetune:<fraction>`` or
    ``linear-on:<dataset>``, each optionally followed by ``@<result key>``.

    Raises:
        ConfigError: The text names no known evaluation.
    """
    head, _, result_key = spec.partition("@")
    if head in SUMMARY_METRICS:
        if result_key:
            raise ConfigError(f"column {spec!r}: '@key' only applies to finetune and linear-on.")
        title, percent, better = SUMMARY_METRICS[head]
        return Column(spec=spec, title=title, percent=percent, higher_is_better=better)
    protocol, sep, argument = head.partition(":")
    key = result_key or None
    if sep and protocol == "finetune":
        try:
            labels = float(argument)
        except ValueError:
            labels = math.nan
        if not 0 < labels <= 1:
            raise ConfigError(
                f"column {spec!r}: the labelled fraction must be a number in (0, 1], e.g. "
                "finetune:0.01."
            )
        return Column(
            spec=spec,
            title=f"FT {100 * labels:g}%" + (f" {key}" if key else ""),
            percent=key is None or key.endswith("_acc"),
            higher_is_better=_higher_is_better(key),
            protocol="finetune",
            labels=labels,
            result_key=key,
        )
    if sep and protocol == "linear-on":
        from fedssd.data.datasets import DATASET_NAMES, USER_DATASETS

        if argument not in DATASET_NAMES or argument in USER_DATASETS:
            names = ", ".join(n for n in DATASET_NAMES if n not in USER_DATASETS)
            raise ConfigError(f"column {spec!r}: unknown dataset {argument!r}; use one of {names}.")
        shown = SUMMARY_METRICS[key][0] if key in SUMMARY_METRICS else (key or "LP")
        return Column(
            spec=spec,
            title=f"{shown} on {argument}",
            percent=key is None or key.endswith("_acc"),
            higher_is_better=_higher_is_better(key),
            protocol="linear",
            eval_data=argument,
            result_key=key,
        )
    known = ", ".join(SUMMARY_METRICS)
    raise ConfigError(
        f"unknown column {spec!r}; use finetune:<fraction>, linear-on:<dataset> or a summary "
        f"metric ({known})."
    )


def _higher_is_better(key: str | None) -> bool | None:
    """Direction of an extra evaluation's result key (accuracies, -L_unif, rank: higher)."""
    if key is None:
        return True
    if key in SUMMARY_METRICS:
        return SUMMARY_METRICS[key][2]
    return True if key.endswith("_acc") else None


def _no_unknown(raw: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; the keys here are: {', '.join(known)}."
        )


def _tables(value: Any, key: str, where: str) -> list[Mapping[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"{where}: {key} must be written as [[{key}]] tables.")
    return value


def _overrides(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{where}: overrides must be a list of "key=value" strings.')
    return tuple(value)


def _check_override(item: str, where: str, *, allow_method: bool) -> None:
    """Refuse overrides the grid sets itself (seed, method.name) or that could not apply to every
    row (method options outside a row)."""
    try:
        key, _ = config_module.parse_override(item)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    if key == "seed":
        raise ConfigError(f"{where}: override {item!r} sets the seed; list seeds in seeds = [...].")
    if key == "method.name" or key == "method":
        raise ConfigError(f"{where}: override {item!r} sets the method; give it as a row's method.")
    if key.startswith("method.") and not allow_method:
        raise ConfigError(
            f"{where}: override {item!r} sets a method option outside a row; move it into the "
            "rows that use it (or into the base config)."
        )


def _name(raw: Mapping[str, Any], kind: str, where: str) -> str:
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"{where}: every {kind} needs a name of letters, digits and _ . + - (it names a "
            f"folder), not {name!r}."
        )
    return name


def _setting(raw: Mapping[str, Any], where: str) -> Setting:
    name = _name(raw, "setting", where)
    here = f"{where}, setting {name!r}"
    _no_unknown(raw, SETTING_KEYS, here)
    overrides = _overrides(raw.get("overrides", []), here)
    for item in overrides:
        _check_override(item, here, allow_method=False)
    return Setting(name=name, overrides=overrides)


def _row(raw: Mapping[str, Any], where: str) -> Row:
    name = _name(raw, "row", where)
    here = f"{where}, row {name!r}"
    _no_unknown(raw, ROW_KEYS, here)
    method = raw.get("method")
    if not isinstance(method, str):
        raise ConfigError(f"{here} needs method = \"<name>\" (see 'fedssd methods').")
    overrides = _overrides(raw.get("overrides", []), here)
    for item in overrides:
        _check_override(item, here, allow_method=True)
    return Row(name=name, method=method, overrides=overrides)


# ----------------------------------------------------------------------------- planning


def plan(grid: Grid, out: Path) -> list[PlannedRun]:
    """Every run of the grid with its resolved config, checked before anything runs.

    Order: setting, then row, then seed (so that a partial sweep fills whole table cells).

    Raises:
        ConfigError: A run's config is invalid, a split file is missing, an extra evaluation is
            not available, or a finished run in ``out`` was made with a different config.
    """
    import fedssd.api as api
    from fedssd.config import MethodConfig
    from fedssd.methods import shared_options

    where = f"grid {grid.path.name}"
    extra = [c for c in grid.columns if c.protocol is not None]
    if extra:
        try:
            from fedssd import protocols
        except ImportError:
            raise ConfigError(
                f"{where}: column {extra[0].spec!r} needs fedssd.protocols (evaluate_run), which "
                "this installation lacks; remove the column or update fedssd."
            ) from None
        fractions = getattr(protocols, "LABEL_FRACTIONS", None)
        for column in extra:
            if column.labels is not None and fractions and column.labels not in fractions:
                allowed = ", ".join(f"finetune:{f:g}" for f in fractions)
                raise ConfigError(f"{where}: column {column.spec!r} is not one of {allowed}.")
    runs: list[PlannedRun] = []
    for setting in grid.settings:
        here = f"{where}, setting {setting.name!r}"
        try:
            base = api.load_config(grid.base, overrides=[*grid.overrides, *setting.overrides])
        except ConfigError as error:
            raise ConfigError(f"{here}: {error}") from None
        for row in grid.rows:
            here = f"{where}, setting {setting.name!r}, row {row.name!r}"
            try:
                method = MethodConfig(
                    name=row.method, options=shared_options(row.method, base.method.options)
                )
                first = api.load_config(
                    dataclasses.replace(base, method=method),
                    overrides=[*row.overrides, f"seed={grid.seeds[0]}"],
                )
                api.check_setup(first)
            except ConfigError as error:
                raise ConfigError(f"{here}: {error}") from None
            split = first.data.split_file
            if first.data.partition == "file" and split is not None and not Path(split).is_file():
                raise ConfigError(
                    f"{here}: split file {split} does not exist (relative paths are read from "
                    "the folder fedssd runs in)."
                )
            for seed in grid.seeds:
                config = dataclasses.replace(first, seed=seed)
                run_dir = out / setting.name / row.name / f"seed-{seed}"
                runs.append(PlannedRun(setting.name, row.name, row.method, seed, config, run_dir))
    for run in runs:
        _check_same_config(run)
    return runs


def check_partitions(runs: Sequence[PlannedRun], where: str) -> None:
    """Load the data and split it for every distinct (data, clients, seed) of the runs still to
    do, so that a split that cannot be made (e.g. a Dirichlet draw leaving a client below
    ``data.min_client_size``) stops the sweep before its first run, not in the middle.

    Raises:
        ConfigError: A run's data cannot be read or split, naming the setting and seed.
    """
    from fedssd.data.federated import prepare_data

    seen: set[str] = set()
    for run in runs:
        if (run.run_dir / "summary.json").is_file():
            continue
        cfg = run.config
        key = repr((cfg.data, cfg.federation.num_clients, cfg.seed))
        if key in seen:
            continue
        seen.add(key)
        try:
            prepare_data(cfg, log=lambda _message: None)
        except FedSSDError as error:
            raise ConfigError(
                f"{where}, setting {run.setting!r}, seed {run.seed}: {error}"
            ) from None


def _check_same_config(run: PlannedRun) -> None:
    """A finished run is reused only if it was made from the config the grid asks for now."""
    saved = run.run_dir / "config.toml"
    if not (run.run_dir / "summary.json").is_file() or not saved.is_file():
        return
    try:
        previous = config_module.load(saved)
    except ConfigError:
        previous = None
    if previous is not None:
        # The thread count says how to run, not what (--threads 1 may finish a sweep begun with
        # more), and where a run was logged to is not part of what it computed.
        previous = dataclasses.replace(
            previous, threads=run.config.threads, tracking=run.config.tracking
        )
    if previous is None or previous != run.config:
        raise ConfigError(
            f"finished run {run.run_dir} was made with a different config than the grid now "
            "gives; choose another --out or delete that folder."
        )


def run_status(run: PlannedRun, columns: Sequence[Column]) -> Status:
    """``done`` (summary and every extra evaluation present), ``evaluate`` (trained, extra
    evaluations missing), ``restart`` (a folder without summary.json: interrupted) or ``new``."""
    if (run.run_dir / "summary.json").is_file():
        have = read_columns(run.run_dir)
        missing = [c for c in columns if c.protocol is not None and c.evaluation not in have]
        return "evaluate" if missing else "done"
    return "restart" if run.run_dir.exists() else "new"


def read_columns(run_dir: Path) -> dict[str, Any]:
    """The extra evaluations recorded in a run's ``columns.json`` (empty when absent)."""
    path = run_dir / COLUMNS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------- execution


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
        executor: Where the runs execute (:mod:`fedssd.executors`); None runs them here, one
            after another.

    Returns:
        The records of every finished run (as in results.csv). Runs that failed are listed in
        ``failed.json`` (and each one's error in its ``error.txt``); the others went on.
    """
    from fedssd.executors import RunTask, SerialExecutor
    from fedssd.outputs import write_json
    from fedssd.tracking import sweep_tracking

    say: Log = log or (lambda _message: None)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SWEEP_FILE, sweep_description(grid))
    started = time.perf_counter()
    trained_seconds: list[float] = []
    total = len(runs)
    tasks: list[RunTask] = []
    statuses: dict[int, Status] = {}
    configs = sweep_tracking(grid.title, out, runs)
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
                train=status in ("restart", "new"),
                columns=tuple(grid.columns),
                verbose=run_log is not None,
            )
        )
    executor = executor or SerialExecutor(run_log)
    words = {"evaluate": "extra evaluations", "restart": "restarting", "new": "starting"}

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
    from fedssd.outputs import write_json

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


def _evaluate_columns(run_dir: Path, columns: Sequence[Column], *, log: Log | None) -> None:
    """Compute the missing extra evaluations of a trained run into its columns.json."""
    from fedssd.outputs import write_json

    have = read_columns(run_dir)
    for column in columns:
        if column.protocol is None or column.evaluation in have:
            continue
        from fedssd.protocols import evaluate_run

        # log=None is silence (sweep --quiet); evaluate_run's own default would print.
        result = evaluate_run(
            run_dir, column.protocol, labels=column.labels, eval_data=column.eval_data, log=log
        )
        have[column.evaluation] = result
        # Written after each evaluation, so that an interruption loses at most the one running.
        write_json(run_dir / COLUMNS_FILE, have)


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


# ----------------------------------------------------------------------------- records


def load_record(run: PlannedRun, columns: Sequence[Column] = ()) -> dict[str, Any] | None:
    """The run's results.csv row: identity, every scalar of summary.json, the value of each
    extra-evaluation column (``<column>``) and every scalar of each extra evaluation's result
    (``<evaluation>/<key>``); None if the run has not finished."""
    path = run.run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    record: dict[str, Any] = {
        "setting": run.setting,
        "row": run.row,
        "method": run.method,
        "seed": run.seed,
    }
    for key, value in summary.items():
        if _is_number(value) and key not in record:
            record[key] = value
    results = read_columns(run.run_dir)
    for column in columns:
        result = results.get(column.evaluation)
        if column.protocol is not None and isinstance(result, Mapping):
            record[column.spec] = headline(result, column.result_key)
    for evaluation, result in results.items():
        if isinstance(result, Mapping):
            for key, value in result.items():
                if _is_number(value):
                    record[f"{evaluation}/{key}"] = value
    return record


def headline(result: Mapping[str, Any], key: str | None = None) -> float | None:
    """The value an extra evaluation shows in the table: ``result[key]``, or the first of
    :data:`HEADLINE_KEYS` it has."""
    for name in (key,) if key else HEADLINE_KEYS:
        value = result.get(name)
        if _is_number(value):
            return float(value)
    return None


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def write_outputs(grid: Grid, out: Path, runs: Sequence[PlannedRun]) -> list[dict[str, Any]]:
    """Write ``results.csv`` and ``table.md`` from the finished runs; return their records."""
    from fedssd.outputs import write_text_atomic

    records = [r for r in (load_record(run, grid.columns) for run in runs) if r is not None]
    write_text_atomic(out / "results.csv", results_csv(records))
    write_text_atomic(out / "table.md", render_table(grid, records))
    return records


def results_csv(records: Sequence[Mapping[str, Any]]) -> str:
    """One line per run: setting, row, method, seed, then every metric any run has."""
    fields = ["setting", "row", "method", "seed"]
    for record in records:
        fields.extend(k for k in record if k not in fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", restval="")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return buffer.getvalue()


# ----------------------------------------------------------------------------- table maths


def summarize(values: Iterable[float]) -> Stat:
    """Mean and sample standard deviation (ddof = 1) of finite values.

    Args:
        values: Per-seed values; None and NaN are left out.

    Returns:
        ``Stat(mean, std, n)``; ``mean`` is NaN when empty, ``std`` NaN when ``n < 2``.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = math.fsum(xs) / n
    if n < 2:
        return Stat(mean, math.nan, 1)
    variance = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return Stat(mean, math.sqrt(variance), n)


def paired_difference(row: Mapping[int, float], baseline: Mapping[int, float]) -> Paired:
    """Per-seed differences ``row[s] - baseline[s]`` over the seeds both have, with their mean
    and sample std; ``within_spread`` when ``|mean| <= std``.

    The same seed gives both runs the same data, split, initial weights and augmentations, so the
    difference removes what the seeds share.
    """
    differences = {
        seed: float(row[seed]) - float(baseline[seed])
        for seed in sorted(set(row) & set(baseline))
        if _finite(row[seed]) and _finite(baseline[seed])
    }
    stat = summarize(differences.values())
    within = stat.n >= 2 and abs(stat.mean) <= stat.std
    return Paired(differences=differences, stat=stat, within_spread=within)


def _finite(value: object) -> TypeGuard[int | float]:
    return _is_number(value) and math.isfinite(value)


def cell_values(
    records: Iterable[Mapping[str, Any]], setting: str, row: str, column: Column
) -> dict[int, float]:
    """Seed -> value of one column for one (setting, row), in display units (% for accuracies)."""
    scale = 100.0 if column.percent else 1.0
    values: dict[int, float] = {}
    for record in records:
        if record["setting"] == setting and record["row"] == row:
            value = record.get(column.spec)
            if _finite(value):
                values[int(record["seed"])] = scale * float(value)
    return values


def _decimals(column: Column) -> int:
    if column.percent:
        return 2
    if column.spec in ("train_seconds", "wall_seconds"):
        return 0
    if column.spec.startswith("effective_rank"):
        return 1
    return 3


def format_stat(stat: Stat, decimals: int, *, signed: bool = False) -> str:
    """``mean ± std`` (``mean`` alone for one value, ``n/a`` for none)."""
    if stat.n == 0:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{stat.mean:{sign}.{decimals}f}"
    if stat.n >= 2:
        text += f" ± {stat.std:.{decimals}f}"
    return text


def render_table(grid: Grid, records: Sequence[Mapping[str, Any]]) -> str:
    """``table.md``: the paper's layout (rows = method rows, columns = settings x evaluations,
    mean ± std over seeds, best mean per column in bold), then the paired differences versus
    the grid's baseline row."""
    lines = [f"# {grid.title}", ""]
    seeds = ", ".join(str(s) for s in grid.seeds)
    done = len(records)
    expected = len(grid.settings) * len(grid.rows) * len(grid.seeds)
    lines += [
        f"{len(grid.seeds)} seeds ({seeds}) per cell: mean ± sample standard deviation "
        "(ddof = 1) over seeds; the best mean of each column in **bold**; accuracies in %. "
        f"{done} of {expected} runs finished"
        + ("." if done == expected else "; a cell with fewer seeds says how many (n = ...)."),
        "",
    ]
    header = ["row", "method"] + [
        f"{s.name} {c.title}" for s in grid.settings for c in grid.columns
    ]
    body: list[list[str]] = [[r.name, r.method] for r in grid.rows]
    for setting in grid.settings:
        for column in grid.columns:
            decimals = _decimals(column)
            stats = [
                summarize(cell_values(records, setting.name, r.name, column).values())
                for r in grid.rows
            ]
            best = _best(stats, column, decimals)
            for cells, stat in zip(body, stats, strict=True):
                text = format_stat(stat, decimals)
                if stat.n and best is not None and round(stat.mean, decimals) == best:
                    text = f"**{text}**"
                if 0 < stat.n < len(grid.seeds):
                    text += f" (n = {stat.n})"
                cells.append(text)
    lines += _markdown(header, body)
    if grid.baseline is not None:
        lines += ["", *render_paired(grid, records)]
    return "\n".join(lines) + "\n"


def _best(stats: Sequence[Stat], column: Column, decimals: int) -> float | None:
    """The best displayed mean of a column (ties at display precision all count as best)."""
    means = [round(s.mean, decimals) for s in stats if s.n]
    if column.higher_is_better is None or not means:
        return None
    return max(means) if column.higher_is_better else min(means)


def render_paired(grid: Grid, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The paired-difference section of ``table.md`` (summary table and per-seed table)."""
    base = grid.baseline
    lines = [
        f"## Paired differences versus `{base}`",
        "",
        f"Per seed, row minus `{base}` on the same seed (same data, split, initial weights and "
        "augmentations); mean ± sample standard deviation (ddof = 1) of those differences, in "
        'the table\'s units (percentage points for accuracies). "within seed spread" marks '
        "|mean| <= std: the difference is not distinguishable from seed noise.",
        "",
    ]
    others = [r for r in grid.rows if r.name != base]
    header = ["row"] + [f"{s.name} {c.title}" for s in grid.settings for c in grid.columns]
    body: list[list[str]] = [[row.name] for row in others]
    detail: list[list[str]] = []
    for setting in grid.settings:
        for column in grid.columns:
            decimals = _decimals(column)
            reference = cell_values(records, setting.name, str(base), column)
            for cells, row in zip(body, others, strict=True):
                paired = paired_difference(
                    cell_values(records, setting.name, row.name, column), reference
                )
                text = _paired_text(paired, decimals)
                cells.append(text)
                per_seed = [
                    f"{paired.differences[s]:+.{decimals}f}" if s in paired.differences else "n/a"
                    for s in grid.seeds
                ]
                detail.append([setting.name, column.title, row.name, *per_seed, text])
    lines += _markdown(header, body)
    lines += ["", "Per-seed differences:", ""]
    seed_header = ["setting", "evaluation", "row", *(f"seed {s}" for s in grid.seeds)]
    lines += _markdown([*seed_header, "mean ± std"], detail)
    return lines


def _paired_text(paired: Paired, decimals: int) -> str:
    text = format_stat(paired.stat, decimals, signed=True)
    if paired.within_spread:
        text += " (within seed spread)"
    elif paired.stat.n == 1:
        text += " (one seed: no spread)"
    return text


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    rows = [list(header), ["---"] * len(header), *(list(r) for r in body)]
    return ["| " + " | ".join(row) + " |" for row in rows]


# ----------------------------------------------------------------------------- command line


def add_sweep_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``fedssd sweep`` to the CLI's sub-command action."""
    sweep: argparse.ArgumentParser = commands.add_parser(
        "sweep",
        help="run a grid of settings x methods x seeds and tabulate it",
        description=(
            "Run every (setting, row, seed) of a grid file one after another into "
            "DIR/<setting>/<row>/seed-<s>/, skipping finished runs and restarting interrupted "
            "ones, then write DIR/results.csv (one line per run) and DIR/table.md (mean ± std "
            "over seeds, best per column in bold, paired differences versus the baseline row). "
            "Every config is checked before the first run starts. Format: docs/sweeps.md."
        ),
    )
    sweep.add_argument("grid", type=Path, metavar="GRID.toml", help="the grid file")
    sweep.add_argument(
        "--out", type=Path, metavar="DIR", help="sweep folder (default: runs/<grid name>)"
    )
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every run, e.g. --set device=cuda (repeatable)",
    )
    from fedssd.cli import add_threads_option

    add_threads_option(sweep)
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="check the grid and its configs and list its runs; run nothing and read no data "
        "(so splits are not checked and nothing is downloaded)",
    )
    sweep.add_argument(
        "--tables-only",
        action="store_true",
        help="rewrite results.csv and table.md from the finished runs; run nothing",
    )
    sweep.add_argument(
        "--quiet", action="store_true", help="print only the sweep's lines, not each run's"
    )
    add_execution_options(sweep)
    return sweep


def add_execution_options(sweep: argparse.ArgumentParser) -> None:
    """The options saying where and how many runs execute at once (docs/sweeps.md)."""
    group = sweep.add_argument_group("execution (docs/sweeps.md)")
    group.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="runs at once: N local worker processes, each with cores // N torch threads "
        "(default 1: one after another in this process)",
    )
    group.add_argument(
        "--devices",
        metavar="cuda:0,cuda:1",
        help="GPUs for the local workers, one each (with device = auto or cuda in the config)",
    )
    group.add_argument(
        "--executor",
        default="local",
        choices=("local", "submitit", "ray"),
        help="local processes (default), Slurm through submitit, or Ray",
    )
    group.add_argument(
        "--cluster",
        default=None,
        metavar="NAME",
        help="submitit's cluster: slurm, or local (runs the jobs as local processes)",
    )
    group.add_argument(
        "--executor-param",
        dest="executor_params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a submitit parameter, e.g. timeout_min=600, slurm_partition=gpu, gpus_per_node=1",
    )
    group.add_argument(
        "--ray-address", metavar="ADDRESS", help="Ray cluster to join (default: a local one)"
    )
    group.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="only the grid's first N runs (in the order setting, row, seed)",
    )
    group.add_argument(
        "--track",
        metavar="BACKENDS",
        help="log every run to tensorboard, wandb and/or mlflow (comma-separated; "
        "docs/tracking.md); the runs are grouped under the sweep",
    )


def run_sweep(args: argparse.Namespace) -> int:
    """``fedssd sweep``: returns the exit code (user errors raise ConfigError)."""
    from fedssd.api import stderr_log

    overrides = list(args.overrides)
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    if getattr(args, "track", None):
        overrides.append(f"tracking.backends={args.track!r}")
    grid = load_grid(args.grid, overrides)
    out: Path = args.out or Path("runs") / grid.path.stem
    runs = plan(grid, out)
    limit = getattr(args, "limit", None)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, not {limit}.")
        runs = runs[:limit]
    if args.dry_run:
        for index, run in enumerate(runs, start=1):
            status = run_status(run, grid.columns)
            print(f"{index:>4}/{len(runs)}  {status:<8}  {run.run_dir}")
        todo = sum(1 for run in runs if run_status(run, grid.columns) != "done")
        print(
            f"{len(runs)} runs checked; {todo} to do. A dry run reads no data: the data and its "
            "splits are checked when the sweep starts."
        )
        return 0
    if not args.tables_only:
        check_partitions(runs, f"grid {grid.path.name}")
    if args.tables_only:
        if not out.is_dir():
            raise ConfigError(f"sweep folder {out} does not exist; run the sweep first.")
        write_outputs(grid, out, runs)
    else:
        from fedssd.cli import continue_with

        continue_with(
            f"continue with: fedssd sweep {args.grid} --out {out} (finished runs are kept; the "
            "interrupted run starts again)"
        )
        run_log = None if args.quiet else stderr_log
        executor = _executor(args, out, runs, run_log)
        execute(grid, out, runs, log=stderr_log, run_log=run_log, executor=executor)
    sys.stdout.write((out / "table.md").read_text(encoding="utf-8"))
    print(f"\nresults.csv and table.md written to {out}/")
    if (out / FAILED_FILE).is_file() and not args.tables_only:
        failed = json.loads((out / FAILED_FILE).read_text(encoding="utf-8"))
        print(
            f"fedssd: {len(failed)} runs failed, the others finished; see {out}/{FAILED_FILE}.",
            file=sys.stderr,
        )
        return 1
    return 0


def _executor(
    args: argparse.Namespace, out: Path, runs: Sequence[PlannedRun], run_log: Log | None
) -> Executor:
    """The executor the command line asks for (checked before any run starts)."""
    from fedssd.executors import make_executor, parse_devices

    devices = parse_devices(getattr(args, "devices", None))
    if devices:
        pinned = sorted({r.config.device for r in runs} - {"auto", "cuda"})
        if pinned:
            raise ConfigError(
                f"--devices spreads runs over GPUs, but the config sets device = {pinned[0]!r}; "
                "set device = auto (or cuda) so that each worker uses its own GPU."
            )
    parameters: dict[str, Any] = {}
    for item in getattr(args, "executor_params", []):
        key, value = config_module.parse_override(item)
        parameters[key] = value
    return make_executor(
        getattr(args, "executor", "local"),
        jobs=getattr(args, "jobs", 1),
        devices=devices,
        run_log=run_log,
        folder=out / ".submitit",
        cluster=getattr(args, "cluster", None),
        parameters=parameters,
        address=getattr(args, "ray_address", None),
    )
