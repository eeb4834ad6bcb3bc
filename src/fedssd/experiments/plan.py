"""Planning a sweep: one checked config and run folder per (setting, row, seed)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedssd import config as config_module
from fedssd.config import Config, MethodConfig
from fedssd.data.federated import prepare_data
from fedssd.errors import ConfigError, FedSSDError
from fedssd.experiment import check_setup
from fedssd.experiments.evaluate import LABEL_FRACTIONS
from fedssd.experiments.grid import COLUMNS_FILE, Column, Grid, Status
from fedssd.methods import option_dict, shared_options
from fedssd.runs.checkpoint import list_checkpoints
from fedssd.runs.resolve import load_config


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a grid, with its fully resolved config and folder."""

    setting: str
    row: str
    method: str
    seed: int
    config: Config
    run_dir: Path


def plan(grid: Grid, out: Path) -> list[PlannedRun]:
    """Every run of the grid with its resolved config, checked before anything runs.

    Order: setting, then row, then seed (so that a partial sweep fills whole table cells).

    Raises:
        ConfigError: A run's config is invalid, a split file is missing, an extra evaluation is
            not available, or a finished run in ``out`` was made with a different config.
    """
    where = f"grid {grid.path.name}"
    for column in grid.columns:
        if column.protocol is not None and column.labels not in (None, *LABEL_FRACTIONS):
            allowed = ", ".join(f"finetune:{f:g}" for f in LABEL_FRACTIONS)
            raise ConfigError(f"{where}: column {column.spec!r} is not one of {allowed}.")
    runs: list[PlannedRun] = []
    for setting in grid.settings:
        here = f"{where}, setting {setting.name!r}"
        try:
            base = load_config(grid.base, overrides=[*grid.overrides, *setting.overrides])
        except ConfigError as error:
            raise ConfigError(f"{here}: {error}") from None
        for row in grid.rows:
            here = f"{where}, setting {setting.name!r}, row {row.name!r}"
            try:
                method = MethodConfig(
                    name=row.method, options=shared_options(row.method, base.method.options)
                )
                first = load_config(
                    dataclasses.replace(base, method=method),
                    overrides=[*row.overrides, f"seed={grid.seeds[0]}"],
                )
                check_setup(first)
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
    """A finished run is reused only if it was made from the config the grid asks for now,
    wherever its data lay then (a sweep folder copied from another machine is still the grid's).
    """
    if (run.run_dir / "summary.json").is_file() and not _made_as_planned(run, anywhere=True):
        raise ConfigError(
            f"finished run {run.run_dir} was made with a different config than the grid now "
            "gives; choose another --out or delete that folder."
        )


def _made_as_planned(run: PlannedRun, *, anywhere: bool = False) -> bool:
    """Whether the run folder's ``config.toml`` is the config the grid gives the run now (False
    when there is none or it cannot be read). With ``anywhere``, a file or folder the config
    names (the data, a split file, a warm start) counts as the same when only the folder it lay
    in differs: the run may have been made on another machine."""
    saved = run.run_dir / "config.toml"
    if not saved.is_file():
        return False
    try:
        previous = config_module.load(saved)
        # A run made before a method option existed ran with that option's default.
        method = MethodConfig(
            name=previous.method.name,
            options=option_dict(previous.method.name, previous.method.options),
        )
    except (ConfigError, OSError):
        return False
    # The thread count says how to run, not what (--threads 1 may finish a sweep begun with
    # more), and where a run was logged to is not part of what it computed.
    previous = dataclasses.replace(
        previous, threads=run.config.threads, tracking=run.config.tracking, method=method
    )
    if anywhere:
        previous = _located_as(previous, run.config)
    return previous == run.config


def _located_as(previous: Config, now: Config) -> Config:
    """``previous`` with each path it names taken from ``now`` where both name the same file
    or folder (the same last part), and with ``now``'s data root (where datasets are looked
    for, not which)."""

    def place(old: str | None, new: str | None) -> str | None:
        if old is None or new is None:
            return old
        return new if Path(old).name == Path(new).name else old

    data, then = now.data, previous.data
    clients = then.clients
    if len(clients) == len(data.clients):
        clients = tuple(str(place(a, b)) for a, b in zip(clients, data.clients, strict=True))
    return dataclasses.replace(
        previous,
        data=dataclasses.replace(
            then,
            path=place(then.path, data.path),
            root=data.root,
            split_file=place(then.split_file, data.split_file),
            clients=clients,
        ),
        evaluation=dataclasses.replace(
            previous.evaluation, data=place(previous.evaluation.data, now.evaluation.data)
        ),
        model=dataclasses.replace(
            previous.model, init_from=place(previous.model.init_from, now.model.init_from)
        ),
    )


def run_status(run: PlannedRun, columns: Sequence[Column]) -> Status:
    """``done`` (summary and every extra evaluation present), ``evaluate`` (trained, extra
    evaluations missing), ``resume`` (interrupted: no summary.json, but a checkpoint of the
    config the grid gives now), ``restart`` (interrupted, nothing to go on from) or ``new``."""
    if (run.run_dir / "summary.json").is_file():
        have = read_columns(run.run_dir)
        missing = [c for c in columns if c.protocol is not None and c.evaluation not in have]
        return "evaluate" if missing else "done"
    if not run.run_dir.exists():
        return "new"
    if list_checkpoints(run.run_dir) and _made_as_planned(run):
        return "resume"
    return "restart"


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
