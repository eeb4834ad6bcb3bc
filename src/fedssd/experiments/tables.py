"""A sweep's records and tables: ``results.csv`` and ``table.md``.

The table maths (:func:`summarize`, :func:`paired_difference`, :func:`render_table`) are pure
functions of the per-run records, so they can be checked without training.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    pass


from fedssd.experiments.grid import HEADLINE_KEYS, Column, Grid
from fedssd.experiments.plan import PlannedRun, read_columns


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
        low: Lower end of the mean difference's 95% confidence interval (Student t with
            ``n - 1`` degrees of freedom); NaN for fewer than two seeds.
        high: Upper end of that interval; NaN for fewer than two seeds.
        p_value: Two-sided p-value of the paired t-test of a zero mean difference; NaN for
            fewer than two seeds.
    """

    differences: dict[int, float]
    stat: Stat
    low: float
    high: float
    p_value: float

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0 (False when there is no interval)."""
        return self.stat.n >= 2 and (self.low > 0.0 or self.high < 0.0)


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
    from fedssd.runs.outputs import write_text_atomic

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
    """Per-seed differences ``row[s] - baseline[s]`` over the seeds both have, with their mean,
    sample std, 95% confidence interval and paired t-test p-value.

    The same seed gives both runs the same data, split, initial weights and augmentations, so the
    difference removes what the seeds share. The interval is ``mean ± t(0.975, n - 1) * std /
    sqrt(n)``; with ``n < 2`` there is none (NaN). Identical differences (std 0) give the
    interval ``[mean, mean]`` and p = 0 for a non-zero mean, p = 1 for a zero one.
    """
    differences = {
        seed: float(row[seed]) - float(baseline[seed])
        for seed in sorted(set(row) & set(baseline))
        if _finite(row[seed]) and _finite(baseline[seed])
    }
    stat = summarize(differences.values())
    low, high, p_value = t_interval(stat)
    return Paired(differences=differences, stat=stat, low=low, high=high, p_value=p_value)


def t_interval(stat: Stat, level: float = 0.95) -> tuple[float, float, float]:
    """Student-t confidence interval of a mean and the two-sided p-value of ``mean = 0``.

    Args:
        stat: Mean, sample std (ddof = 1) and count of the values.
        level: Coverage of the interval.

    Returns:
        ``(low, high, p_value)``; all NaN when ``stat.n < 2``.
    """
    if stat.n < 2:
        return math.nan, math.nan, math.nan
    from scipy import stats as scipy_stats

    dof = stat.n - 1
    error = stat.std / math.sqrt(stat.n)
    if error == 0.0:
        return stat.mean, stat.mean, 1.0 if stat.mean == 0.0 else 0.0
    half = float(scipy_stats.t.ppf(0.5 + level / 2, dof)) * error
    p_value = float(2.0 * scipy_stats.t.sf(abs(stat.mean) / error, dof))
    return stat.mean - half, stat.mean + half, p_value


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
    if any(row.paper for row in grid.rows):
        lines += [
            "(paper X, Δ ±Y): X is the number the paper publishes for that cell (Fang et al., "
            "ICCV 2025), Y the measured mean minus X, in the table's units (percentage points "
            "for accuracies).",
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
            for cells, stat, row in zip(body, stats, grid.rows, strict=True):
                text = format_stat(stat, decimals)
                if stat.n and best is not None and round(stat.mean, decimals) == best:
                    text = f"**{text}**"
                if 0 < stat.n < len(grid.seeds):
                    text += f" (n = {stat.n})"
                published = row.paper_value(setting.name, column.spec)
                if published is not None:
                    text += _paper_text(stat, published, decimals)
                cells.append(text)
    lines += _markdown(header, body)
    if grid.baseline is not None:
        lines += ["", *render_paired(grid, records)]
    return "\n".join(lines) + "\n"


def _paper_text(stat: Stat, published: float, decimals: int) -> str:
    """`` (paper 80.84, Δ +0.41)``; without Δ when nothing was measured."""
    if stat.n == 0:
        return f" (paper {published:.{decimals}f})"
    delta = stat.mean - published
    if round(delta, decimals) == 0:
        delta = 0.0  # no "-0.00"
    return f" (paper {published:.{decimals}f}, Δ {delta:+.{decimals}f})"


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
        "augmentations); the mean of those differences in the table's units (percentage points "
        "for accuracies), its 95% confidence interval [low, high] (Student t with n - 1 degrees "
        "of freedom: mean ± t * std / sqrt(n)), the two-sided p-value of the paired t-test and "
        "the number of seeds n. A difference is marked **significant** only when its interval "
        "excludes 0; one seed gives no interval (n/a).",
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
    lines += _markdown([*seed_header, "mean [95% CI], p, n"], detail)
    return lines


def _paired_text(paired: Paired, decimals: int) -> str:
    """``+1.00 [-3.97, +5.97], p = 0.48, n = 3`` (``significant`` appended when the interval
    excludes 0; ``n/a`` in place of the interval for one seed)."""
    stat = paired.stat
    if stat.n == 0:
        return "n/a"
    text = f"{stat.mean:+.{decimals}f}"
    if stat.n < 2:
        return f"{text} [n/a], n = 1"
    text += f" [{paired.low:+.{decimals}f}, {paired.high:+.{decimals}f}]"
    text += f", p {_p_text(paired.p_value)}, n = {stat.n}"
    if paired.significant:
        text += " **significant**"
    return text


def _p_text(p_value: float) -> str:
    """``= 0.48``, ``= 0.031`` (two significant digits), ``< 0.001`` below that."""
    if p_value < 0.001:
        return "< 0.001"
    return f"= {p_value:.2g}" if p_value < 0.1 else f"= {p_value:.2f}"


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    rows = [list(header), ["---"] * len(header), *(list(r) for r in body)]
    return ["| " + " | ".join(row) + " |" for row in rows]


# Headline columns of `fedssd train` and `fedssd compare` tables: key, title, scale, format.
TABLE_COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    ("linear_probe_acc", "LP acc %", 100.0, "{:.2f}"),
    ("knn_acc", "kNN acc %", 100.0, "{:.2f}"),
    ("uniformity_global", "-L_unif global", 1.0, "{:.3f}"),
    ("uniformity_inter_mean", "-L_unif inter", 1.0, "{:.3f}"),
    ("uniformity_intra_mean", "-L_unif intra", 1.0, "{:.3f}"),
    ("alignment", "L_align", 1.0, "{:.3f}"),
    ("effective_rank", "eff. rank", 1.0, "{:.1f}"),
    ("uniformity_global_z", "-L_unif global (z)", 1.0, "{:.3f}"),
    ("train_seconds", "train s", 1.0, "{:.0f}"),
)


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """A Markdown table with one row per method and one column per headline metric."""
    columns = [c for c in TABLE_COLUMNS if any(c[0] in s for s in summaries.values())]
    header = ["method", *(c[1] for c in columns)]
    rows = [header, ["---"] * len(header)]
    for name, summary in summaries.items():
        cells = [name]
        for key, _title, scale, fmt in columns:
            value = summary.get(key)
            cells.append("n/a" if value is None else fmt.format(value * scale))
        rows.append(cells)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
