"""Grid files: settings x method rows x seeds and the evaluations that form a table's columns.

A grid file (TOML) names a base config, the seeds, the settings (e.g. cross-silo and cross-device,
each a list of ``key=value`` overrides), the rows (a method plus overrides, e.g. SSD without DSR)
and the evaluations that form the table's columns. :func:`load_grid` checks the file's structure;
:func:`fedssd.experiments.plan.plan` checks every run's config. docs/sweeps.md describes the
format.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fedssd import config as config_module
from fedssd import presets
from fedssd.errors import ConfigError

if TYPE_CHECKING:
    pass

Log = Callable[[str], None]
Status = Literal["done", "evaluate", "resume", "restart", "new"]

GRID_KEYS = ("base", "title", "seeds", "overrides", "settings", "rows", "columns", "baseline")
SETTING_KEYS = ("name", "overrides")
ROW_KEYS = ("name", "method", "overrides", "paper")
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
    # Published numbers to show beside the measured ones: (setting, column spec, value in the
    # table's display units), from the row's ``[rows.paper]`` table.
    paper: tuple[tuple[str, str, float], ...] = ()

    def paper_value(self, setting: str, spec: str) -> float | None:
        """The published number of one cell, or None."""
        for name, column, value in self.paper:
            if name == setting and column == spec:
                return value
        return None


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


def _base_path(grid: Path, base: str) -> Path:
    """A grid's base config: a path relative to the grid file, else a preset's name."""
    path = grid.parent / base
    if path.is_file():
        return path
    return presets.packaged(base) or path


def load_grid(path: str | Path, overrides: Sequence[str] = ()) -> Grid:
    """Read and check a grid file's structure (the configs are checked by :func:`plan`).

    Args:
        path: The grid TOML file.
        overrides: Extra ``key=value`` overrides for every run (the command's ``--set``).

    Raises:
        ConfigError: The file is missing or malformed, in one sentence.
    """
    path = presets.grid_path(path)
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
    _check_paper(rows, settings, columns, where)
    return Grid(
        path=path,
        base=_base_path(path, base),
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
    return Row(name=name, method=method, overrides=overrides, paper=_paper(raw.get("paper"), here))


def _paper(value: Any, where: str) -> tuple[tuple[str, str, float], ...]:
    """A row's ``paper`` table: setting name -> {column spec -> published number}."""
    if value is None:
        return ()
    example = '[rows.paper] c10-silo = { linear_probe_acc = 80.84, "finetune:0.01" = 69.99 }'
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: paper must be a table of settings, e.g. {example}.")
    cells: list[tuple[str, str, float]] = []
    for setting, numbers in value.items():
        if not isinstance(numbers, Mapping) or not numbers:
            raise ConfigError(
                f"{where}: paper.{setting} must be a table of column -> number, e.g. {example}."
            )
        for spec, number in numbers.items():
            if (
                not isinstance(number, int | float)
                or isinstance(number, bool)
                or not math.isfinite(number)
            ):
                raise ConfigError(
                    f"{where}: paper.{setting}.{spec} must be a finite number, not {number!r}."
                )
            cells.append((str(setting), str(spec), float(number)))
    return tuple(cells)


def _check_paper(
    rows: Sequence[Row], settings: Sequence[Setting], columns: Sequence[Column], where: str
) -> None:
    """Every published number names one of the grid's settings and columns."""
    setting_names = [s.name for s in settings]
    specs = [c.spec for c in columns]
    for row in rows:
        for setting, spec, _value in row.paper:
            if setting not in setting_names:
                raise ConfigError(
                    f"{where}, row {row.name!r}: paper names setting {setting!r}, which is not "
                    f"one of {', '.join(setting_names)}."
                )
            if spec not in specs:
                raise ConfigError(
                    f"{where}, row {row.name!r}: paper.{setting} names column {spec!r}, which is "
                    f"not one of the grid's columns ({', '.join(specs)})."
                )
