"""Grids: parsing and validation, the table maths against hand computations, resume, and one
real tiny sweep end to end."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import fedssd.api
import fedssd.data.federated
import fedssd.experiments
from fedssd import cli
from fedssd import config as config_module
from fedssd.errors import ConfigError
from fedssd.experiments import execute as execution
from fedssd.experiments import executors, tables
from fedssd.experiments import grid as grids
from fedssd.experiments import plan as planning
from fedssd.runs.resolve import load_config

SMOKE = Path(__file__).resolve().parents[2] / "src" / "fedssd" / "configs" / "smoke.toml"
GRIDS = Path(__file__).resolve().parents[2] / "src" / "fedssd" / "configs" / "grids"

# Small enough that a real run takes a few seconds on one core.
TINY = [
    "data.train_subset=400",
    "data.test_subset=200",
    "federation.rounds=1",
    "evaluation.linear_epochs=5",
    "evaluation.metrics_samples=200",
    "evaluation.metrics_per_client=50",
]


def write_grid(
    folder: Path,
    *,
    seeds: Sequence[int] = (1, 2),
    rows: str | None = None,
    settings: str = '[[settings]]\nname = "silo"\noverrides = []\n',
    extra: str = "",
    overrides: Sequence[str] = TINY,
) -> Path:
    """A grid file over the smoke preset (base given as a path relative to the grid)."""
    if rows is None:
        rows = (
            '[[rows]]\nname = "base"\nmethod = "fedalignuniform"\n\n'
            '[[rows]]\nname = "+PD"\nmethod = "ssd"\noverrides = ["method.dsr=false"]\n'
        )
    folder.mkdir(parents=True, exist_ok=True)
    text = f'base = "{os.path.relpath(SMOKE, folder)}"\n'
    text += f"seeds = {list(seeds)}\n"
    text += f"overrides = {json.dumps(list(overrides))}\n"
    text += extra + "\n" + settings + "\n" + rows
    path = folder / "grid.toml"
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- table maths


def test_summarize_is_mean_and_sample_std() -> None:
    stat = tables.summarize([1.0, 2.0, 4.0])
    # mean 7/3; squared deviations 16/9, 1/9, 25/9 sum to 42/9; / (n - 1) = 7/3.
    assert stat.n == 3
    assert stat.mean == pytest.approx(7 / 3)
    assert stat.std == pytest.approx(math.sqrt(7 / 3))
    one = tables.summarize([5.0])
    assert one.mean == 5.0 and one.n == 1 and math.isnan(one.std)
    assert tables.summarize([]).n == 0
    assert tables.summarize([1.0, math.nan, 3.0]) == tables.Stat(2.0, math.sqrt(2.0), 2)


def test_paired_difference_by_seed() -> None:
    row = {1: 0.5, 2: 0.7, 3: 0.2, 4: 9.0}  # seed 4 has no baseline: left out
    base = {1: 0.4, 2: 0.2, 3: 0.3, 5: 1.0}
    paired = tables.paired_difference(row, base)
    assert list(paired.differences) == [1, 2, 3]
    assert [round(d, 12) for d in paired.differences.values()] == [0.1, 0.5, -0.1]
    mean = (0.1 + 0.5 - 0.1) / 3
    std = math.sqrt(((0.1 - mean) ** 2 + (0.5 - mean) ** 2 + (-0.1 - mean) ** 2) / 2)
    assert paired.stat.mean == pytest.approx(mean)
    assert paired.stat.std == pytest.approx(std)
    # t(0.975, 2) = 4.302652729911275 (two-sided 95%, 2 degrees of freedom; tables).
    half = 4.302652729911275 * std / math.sqrt(3)
    assert (paired.low, paired.high) == pytest.approx((mean - half, mean + half))
    assert not paired.significant  # the interval holds 0
    clear = tables.paired_difference({1: 2.0, 2: 2.1, 3: 1.9}, {1: 1.0, 2: 1.0, 3: 1.0})
    assert clear.stat.mean == pytest.approx(1.0) and clear.stat.std == pytest.approx(0.1)
    assert clear.significant
    one = tables.paired_difference({1: 2.0}, {1: 1.0})  # no interval from one seed
    assert not one.significant and math.isnan(one.low) and math.isnan(one.p_value)


def _t3_cdf(t: float) -> float:
    """Student t CDF with 3 degrees of freedom, closed form."""
    x = t / math.sqrt(3)
    return 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi


def test_paired_interval_and_p_value_by_hand() -> None:
    # Differences 1, 2, 3, 4: mean 2.5, sd sqrt(5/3) = 1.29099, t(0.975, 3) = 3.182446.
    paired = tables.paired_difference(
        {s: float(s) for s in (1, 2, 3, 4)}, dict.fromkeys(range(1, 5), 0.0)
    )
    sd = math.sqrt(5 / 3)
    assert paired.stat.std == pytest.approx(sd)
    assert _t3_cdf(3.182446305) == pytest.approx(0.975, abs=1e-9)
    assert paired.low == pytest.approx(2.5 - 3.182446305 * sd / 2, abs=1e-8)
    assert paired.high == pytest.approx(2.5 + 3.182446305 * sd / 2, abs=1e-8)
    assert (round(paired.low, 3), round(paired.high, 3)) == (0.446, 4.554)
    t_stat = 2.5 / (sd / 2)  # 3.873
    assert paired.p_value == pytest.approx(2 * (1 - _t3_cdf(t_stat)))
    assert round(paired.p_value, 4) == 0.0305
    assert paired.significant


def test_paired_zero_spread() -> None:
    same = tables.paired_difference({1: 2.0, 2: 3.0}, {1: 1.0, 2: 2.0})  # differences 1, 1
    assert (same.low, same.high, same.p_value) == (1.0, 1.0, 0.0) and same.significant
    none = tables.paired_difference({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0})
    assert (none.low, none.high, none.p_value) == (0.0, 0.0, 1.0) and not none.significant


def _records(values: dict[tuple[str, str], Sequence[float]]) -> list[dict[str, Any]]:
    """Records with linear_probe_acc = value, knn_acc = value / 2 for seeds 1, 2, 3, ..."""
    records = []
    for (setting, row), series in values.items():
        for seed, value in enumerate(series, start=1):
            records.append(
                {
                    "setting": setting,
                    "row": row,
                    "method": "ssd",
                    "seed": seed,
                    "linear_probe_acc": value,
                    "knn_acc": value / 2,
                }
            )
    return records


def _cells(table: str, first: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {first} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_cells_match_hand_computation(tmp_path: Path) -> None:
    grid = grids.load_grid(write_grid(tmp_path, seeds=(1, 2, 3), extra='baseline = "base"'))
    records = _records(
        {
            ("silo", "base"): [0.80, 0.82, 0.84],  # mean 82, std 2 (in %)
            ("silo", "+PD"): [0.81, 0.85, 0.83],  # mean 83, std 2; diffs +1, +3, -1
        }
    )
    table = tables.render_table(grid, records)
    assert "3 seeds (1, 2, 3)" in table
    base, plus = _cells(table, "base"), _cells(table, "+PD")
    assert base[:3] == ["base", "fedalignuniform", "82.00 ± 2.00"]
    assert plus[:3] == ["+PD", "ssd", "**83.00 ± 2.00**"]
    assert base[3] == "41.00 ± 1.00" and plus[3] == "**41.50 ± 1.00**"
    # Paired: differences +1, +3, -1 points: mean 1, std 2; t(0.975, 2) = 4.3027 gives the
    # half-width 4.3027 * 2 / sqrt(3) = 4.97; t = 1 / (2 / sqrt(3)) = 0.866 on 2 degrees of
    # freedom: p = 1 - t / sqrt(2 + t^2) = 0.48.
    paired_section = table.split("## Paired differences")[1]
    assert _cells(paired_section, "+PD")[1] == "+1.00 [-3.97, +5.97], p = 0.48, n = 3"
    detail = next(line for line in paired_section.splitlines() if line.startswith("| silo | LP |"))
    assert [c.strip() for c in detail.strip("|").split("|")][3:6] == ["+1.00", "+3.00", "-1.00"]


def test_table_marks_partial_cells_and_ties(tmp_path: Path) -> None:
    grid = grids.load_grid(write_grid(tmp_path, seeds=(1, 2, 3)))
    records = _records({("silo", "base"): [0.5, 0.7], ("silo", "+PD"): [0.6, 0.6, 0.6]})
    table = tables.render_table(grid, records)
    assert "5 of 6 runs finished" in table
    assert _cells(table, "base")[2] == "**60.00 ± 14.14** (n = 2)"  # equal means: both bold
    assert _cells(table, "+PD")[2] == "**60.00 ± 0.00**"
    assert "Paired" not in table  # no baseline named


def test_lower_is_better_and_unbolded_columns(tmp_path: Path) -> None:
    grid = grids.load_grid(
        write_grid(tmp_path, seeds=(1,), extra='columns = ["alignment", "train_seconds"]')
    )
    records = [
        {"setting": "silo", "row": "base", "seed": 1, "alignment": 0.5, "train_seconds": 10.0},
        {"setting": "silo", "row": "+PD", "seed": 1, "alignment": 0.4, "train_seconds": 5.0},
    ]
    table = tables.render_table(grid, records)
    assert _cells(table, "+PD")[4:6] == ["**0.400**", "5"]
    assert _cells(table, "base")[4:6] == ["0.500", "10"]


def test_results_csv_has_one_line_per_run_and_every_metric() -> None:
    text = tables.results_csv(
        [
            {"setting": "a", "row": "r", "method": "m", "seed": 1, "knn_acc": 0.5},
            {"setting": "a", "row": "r", "method": "m", "seed": 2, "uniformity_global": 3.1},
        ]
    )
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["seed"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["setting", "row", "method", "seed", "knn_acc", "uniformity_global"]
    assert rows[1]["knn_acc"] == "" and rows[1]["uniformity_global"] == "3.1"


def test_columns_parse() -> None:
    ft = grids.parse_column("finetune:0.01")
    assert (ft.title, ft.protocol, ft.labels, ft.percent) == ("FT 1%", "finetune", 0.01, True)
    lp = grids.parse_column("linear-on:cifar10")
    assert (lp.title, lp.protocol, lp.eval_data) == ("LP on cifar10", "linear", "cifar10")
    rank = grids.parse_column("linear-on:cifar10@effective_rank")
    assert (rank.result_key, rank.percent, rank.title) == (
        "effective_rank",
        False,
        "eff. rank on cifar10",
    )
    assert tables.headline({"finetune_best_acc": 0.7, "finetune_last_acc": 0.6}) == 0.7
    assert tables.headline({"finetune_best_acc": 0.7, "finetune_last_acc": 0.6}, "x") is None


# ----------------------------------------------------------------------------- validation


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a run started although the grid is invalid")

    monkeypatch.setattr(fedssd.api, "train", refuse)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"extra": "colums = []"}, "unknown key 'colums'"),
        ({"extra": 'columns = ["finetune:2"]'}, "labelled fraction"),
        ({"extra": 'columns = ["top5"]'}, "unknown column 'top5'"),
        ({"extra": 'baseline = "nope"'}, "baseline 'nope'"),
        ({"seeds": ()}, "seeds must be a non-empty list"),
        ({"seeds": (1, 1)}, "must not repeat"),
        ({"overrides": ["federation.rounds"]}, "key=value"),
        ({"overrides": ["seed=3"]}, "list seeds in seeds"),
        ({"overrides": ["method.dsr=false"]}, "move it into the rows"),
        ({"rows": '[[rows]]\nname = "a"\nmethod = "ssd"\nfoo = 1\n'}, "unknown key 'foo'"),
        ({"rows": '[[rows]]\nname = "a b"\nmethod = "ssd"\n'}, "names a folder"),
        ({"rows": '[[rows]]\nname = "a"\n'}, "needs method"),
        ({"rows": '[[rows]]\nname = "a"\nmethod = "ssd"\n' * 2}, "used twice"),
        ({"rows": '[[rows]]\nname="a"\nmethod="ssd"\noverrides=["method.name=x"]\n'}, "a row's"),
    ],
)
def test_grid_errors_are_one_sentence(
    kwargs: dict[str, Any], fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    with pytest.raises(ConfigError) as caught:
        planning.plan(grids.load_grid(write_grid(tmp_path, **kwargs)), tmp_path / "out")
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message and message.endswith(".")


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        ('[[rows]]\nname = "a"\nmethod = "nope"\n', "unknown method 'nope'"),
        ('[[rows]]\nname = "a"\nmethod = "ssd"\noverrides = ["method.dsr=3"]\n', "true or false"),
        ('[[rows]]\nname = "a"\nmethod = "ssd"\noverrides = ["method.bogus=1"]\n', "bogus"),
        ('[[rows]]\nname = "a"\nmethod = "ssd"\noverrides = ["data.alpha=-1"]\n', "data.alpha"),
        (
            '[[rows]]\nname = "ok"\nmethod = "ssd"\n\n'
            '[[rows]]\nname = "late"\nmethod = "fedalignuniform"\n'
            'overrides = ["federation.rounds=0"]\n',
            "row 'late'",
        ),
    ],
)
def test_every_config_is_checked_before_any_run(
    rows: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    grid = grids.load_grid(write_grid(tmp_path, rows=rows))
    with pytest.raises(ConfigError) as caught:
        planning.plan(grid, tmp_path / "out")
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value) and str(caught.value).endswith(".")
    assert not (tmp_path / "out").exists()


def test_setting_errors_name_the_setting_and_split_files_are_checked(tmp_path: Path) -> None:
    bad = '[[settings]]\nname = "x"\noverrides = ["federation.fraction=3"]\n'
    with pytest.raises(ConfigError, match=r"setting 'x'.*fraction"):
        planning.plan(grids.load_grid(write_grid(tmp_path, settings=bad)), tmp_path / "o")
    missing = (
        '[[settings]]\nname = "x"\noverrides = ["data.partition=\\"file\\"", '
        '"data.split_file=\\"absent.json\\"", "data.train_subset=0"]\n'
    )
    with pytest.raises(ConfigError, match=r"split file .*absent\.json does not exist"):
        planning.plan(grids.load_grid(write_grid(tmp_path, settings=missing)), tmp_path / "o")


def test_a_split_that_cannot_be_made_stops_the_sweep_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    impossible = (
        '[[settings]]\nname = "crowded"\noverrides = ["federation.num_clients=30", '
        '"data.min_client_size=12"]\n'
    )
    grid = grids.load_grid(write_grid(tmp_path, settings=impossible, seeds=(3,)))
    runs = planning.plan(grid, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"setting 'crowded', seed 3: No Dirichlet split"):
        planning.check_partitions(runs, "grid grid.toml")
    assert not (tmp_path / "out").exists()


def test_rows_get_their_method_and_keep_shared_base_options(tmp_path: Path) -> None:
    path = write_grid(
        tmp_path,
        settings='[[settings]]\nname = "device"\noverrides = '
        '["federation.num_clients=6", "federation.fraction=0.5"]\n',
    )
    runs = planning.plan(grids.load_grid(path), tmp_path / "out")
    assert [(r.row, r.seed) for r in runs] == [("base", 1), ("base", 2), ("+PD", 1), ("+PD", 2)]
    first, pd_only = runs[0], runs[2]
    assert first.config.method.name == "fedalignuniform" and first.config.seed == 1
    assert first.config.federation.num_clients == 6 and first.config.federation.fraction == 0.5
    assert first.config.federation.rounds == 1  # the grid's common overrides
    assert pd_only.config.method.options["dsr"] is False and pd_only.config.method.options["pd"]
    assert first.run_dir == tmp_path / "out" / "device" / "base" / "seed-1"


def test_shipped_grids_validate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_training(monkeypatch)
    monkeypatch.chdir(tmp_path)  # packaged grids, their bases and split files from any folder
    fmnist = planning.plan(grids.load_grid("fmnist-ablation"), tmp_path / "f")
    assert len(fmnist) == 50
    assert {r.config.data.name for r in fmnist} == {"fashion_mnist"}
    for name in ("paper-main", "paper-ablation", "paper-transfer"):
        grid = grids.load_grid(name)
        assert grid.path == GRIDS / f"{name}.toml"
        runs = planning.plan(grid, tmp_path / name)
        assert runs
        splits = {r.config.data.split_file for r in runs} - {None}
        assert splits, name
        for split in splits:
            assert split is not None
            assert Path(split).parent == GRIDS.parent / "splits" and Path(split).is_file()


def test_grid_names_and_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A grid on disk wins over a packaged grid's name; an unknown name says where names are."""
    monkeypatch.chdir(tmp_path)
    assert grids.load_grid("grids/paper-main").path == GRIDS / "paper-main.toml"
    (tmp_path / "paper-main").write_text(
        f'base = "{SMOKE}"\nseeds = [1]\n[[rows]]\nname = "a"\nmethod = "ssd"\n'
    )
    assert grids.load_grid("paper-main").path == Path("paper-main")
    with pytest.raises(ConfigError, match="fedssd configs"):
        grids.load_grid("no-such-grid")


# ----------------------------------------------------------------------------- resume


class FakeTrain:
    """Stands in for fedssd.api.train: writes config.toml, optionally summary.json, and counts."""

    def __init__(self, *, finish: bool = True) -> None:
        self.calls: list[tuple[Path, bool]] = []
        self.finish = finish

    def __call__(self, config: Any, *, out: Path, overwrite: bool, **_kwargs: Any) -> None:
        self.calls.append((Path(out), overwrite))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(config_module.dumps(config), encoding="utf-8")
        if self.finish:
            summary = {"linear_probe_acc": 0.5 + config.seed / 100, "knn_acc": 0.4}
            (out / "summary.json").write_text(json.dumps(summary), encoding="utf-8")


def fake_protocols(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, str, Any]]:
    """A stand-in evaluate_run for the sweep's extra evaluations that records its calls."""
    calls: list[tuple[Path, str, Any]] = []

    def evaluate_run(run_dir: Path, protocol: str, **kwargs: Any) -> dict[str, Any]:
        calls.append((Path(run_dir), protocol, kwargs.get("labels")))
        return {"finetune_best_acc": 0.6, "finetune_last_acc": 0.55}

    monkeypatch.setattr(executors, "evaluate_run", evaluate_run)
    return calls


def test_resume_skips_finished_runs_and_restarts_interrupted_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluations = fake_protocols(monkeypatch)
    fake = FakeTrain()
    monkeypatch.setattr(fedssd.api, "train", fake)
    # Two columns of one evaluation: it runs once per run, each column shows its own key.
    columns = 'columns = ["finetune:0.1", "finetune:0.1@finetune_last_acc"]'
    grid = grids.load_grid(write_grid(tmp_path, extra=columns))
    out = tmp_path / "sweep"
    lines: list[str] = []
    runs = planning.plan(grid, out)
    execution.execute(grid, out, runs, log=lines.append, run_log=None)
    assert len(fake.calls) == 4 and len(evaluations) == 4
    assert "run 4/4" in "\n".join(lines) and "left" in "\n".join(lines)

    # Interrupted: a folder without summary.json. Trained but not evaluated: no columns.json.
    interrupted = out / "silo" / "+PD" / "seed-2"
    (interrupted / "summary.json").unlink()
    (interrupted / "metrics.jsonl").write_text('{"round": 1}\n', encoding="utf-8")
    unevaluated = out / "silo" / "base" / "seed-1"
    (unevaluated / grids.COLUMNS_FILE).unlink()
    fake.calls.clear()
    evaluations.clear()
    lines.clear()
    runs = planning.plan(grid, out)
    assert [planning.run_status(r, grid.columns) for r in runs] == [
        "evaluate",
        "done",
        "done",
        "restart",
    ]
    records = execution.execute(grid, out, runs, log=lines.append, run_log=None)
    assert fake.calls == [(interrupted, True)]
    assert sorted(e[0] for e in evaluations) == sorted([unevaluated, interrupted])
    assert sum("skipped" in line for line in lines) == 2
    assert len(records) == 4 and all(r["finetune:0.1"] == 0.6 for r in records)
    assert all(r["finetune:0.1@finetune_last_acc"] == 0.55 for r in records)
    assert records[0]["finetune:0.1/finetune_last_acc"] == 0.55

    # Everything done: nothing runs; a changed grid refuses to reuse the runs.
    fake.calls.clear()
    execution.execute(grid, out, planning.plan(grid, out), log=None, run_log=None)
    assert fake.calls == []
    changed = grids.load_grid(grid.path, ["federation.lr=0.01"])
    with pytest.raises(ConfigError, match="different config"):
        planning.plan(changed, out)


def test_a_finished_sweep_made_where_the_data_lay_elsewhere_is_still_the_grids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep folder copied from another machine names that machine's paths in its runs'
    config.toml: they are the grid's runs still when only the folders differ, and not when the
    file differs."""
    monkeypatch.setattr(fedssd.api, "train", FakeTrain())
    data = tmp_path / "here" / "photos.tar.gz"
    data.parent.mkdir()
    data.write_bytes(b"")
    extra = [f"data.path={data}", f"data.root={tmp_path / 'cache'}"]
    grid = grids.load_grid(write_grid(tmp_path, seeds=(1,)), extra)
    out = tmp_path / "sweep"
    execution.execute(grid, out, planning.plan(grid, out), log=None, run_log=None)

    def made_elsewhere(name: str) -> None:
        for saved in out.rglob("config.toml"):
            config = config_module.load(saved)
            config = dataclasses.replace(
                config,
                data=dataclasses.replace(
                    config.data, path=f"/elsewhere/data/{name}", root="/elsewhere/cache"
                ),
            )
            saved.write_text(config_module.dumps(config), encoding="utf-8")

    made_elsewhere("photos.tar.gz")
    runs = planning.plan(grid, out)
    assert [planning.run_status(r, grid.columns) for r in runs] == ["done", "done"]
    made_elsewhere("other-photos.tar.gz")
    with pytest.raises(ConfigError, match="different config"):
        planning.plan(grid, out)


def test_an_interrupted_run_with_a_checkpoint_of_its_config_is_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTrain(finish=False)  # interrupted: config.toml, no summary.json
    monkeypatch.setattr(fedssd.api, "train", fake)
    grid = grids.load_grid(write_grid(tmp_path, seeds=(1,)))
    out = tmp_path / "sweep"
    runs = planning.plan(grid, out)
    execution.execute(grid, out, runs, log=None, run_log=None)
    assert [planning.run_status(r, grid.columns) for r in runs] == ["restart", "restart"]
    # A checkpoint folder makes it resumable, if its config.toml is the one the grid gives now.
    for run in runs:
        (run.run_dir / "checkpoints" / "round-000001").mkdir(parents=True)
    assert [planning.run_status(r, grid.columns) for r in runs] == ["resume", "resume"]
    edited = runs[1].run_dir / "config.toml"
    edited.write_text(edited.read_text().replace("seed = 1", "seed = 5"), encoding="utf-8")
    assert [planning.run_status(r, grid.columns) for r in runs] == ["resume", "restart"]
    edited.write_text("not toml [", encoding="utf-8")
    assert planning.run_status(runs[1], grid.columns) == "restart"
    # The checkpoint cannot be read (an empty folder): said, and the run trained from scratch.
    # Said on the sweep's own lines too, which --quiet keeps.
    fake.calls.clear()
    lines: list[str] = []
    execution.execute(grid, out, runs, log=lines.append, run_log=None)
    text = "\n".join(lines)
    assert "run 1/2 silo/base/seed-1: resuming from its newest checkpoint" in text, text
    assert "run 2/2 silo/+PD/seed-1: restarting" in text, text
    said = "run 1/2 silo/base/seed-1: could not be resumed (checkpoint "
    assert said in text and "it was trained again from the start" in text, text
    assert "+PD/seed-1: could not be resumed" not in text, text
    assert fake.calls == [(runs[0].run_dir, True), (runs[1].run_dir, True)]


# ----------------------------------------------------------------------------- end to end


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedssd")
    cli.add_sweep_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.slow
def test_real_tiny_sweep_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_train: Callable[..., Any] = fedssd.api.train
    calls: list[Path] = []

    def counting_train(*args: Any, **kwargs: Any) -> Any:
        calls.append(Path(kwargs["out"]))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(fedssd.api, "train", counting_train)
    grid_path = write_grid(tmp_path, extra='baseline = "base"')
    out = tmp_path / "sweep"
    assert cli.run_sweep(_parse(["sweep", str(grid_path), "--out", str(out), "--quiet"])) == 0
    assert len(calls) == 4
    printed = capsys.readouterr()
    assert "| row | method | silo LP | silo kNN |" in printed.out
    assert "[sweep] run 4/4" in printed.err

    with (out / "results.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["row"], r["seed"]) for r in rows] == [
        ("base", "1"),
        ("base", "2"),
        ("+PD", "1"),
        ("+PD", "2"),
    ]
    summaries = {
        (r["row"], int(r["seed"])): json.loads(
            (out / "silo" / r["row"] / f"seed-{r['seed']}" / "summary.json").read_text()
        )
        for r in rows
    }
    for r in rows:
        assert float(r["knn_acc"]) == summaries[(r["row"], int(r["seed"]))]["knn_acc"]
    # The table's kNN cell of +PD from the two summaries, by hand.
    a, b = (100 * summaries[("+PD", s)]["knn_acc"] for s in (1, 2))
    table = (out / "table.md").read_text(encoding="utf-8")
    expected = f"{(a + b) / 2:.2f} ± {abs(a - b) / math.sqrt(2):.2f}"
    assert expected in _cells(table, "+PD")[3]
    assert json.loads((out / "sweep.json").read_text())["baseline"] == "base"

    # Interrupt one run (summary gone, a line too many in its metrics): only it runs again,
    # from its checkpoint of the last round (the final evaluation had not finished).
    victim = out / "silo" / "base" / "seed-2"
    before = (victim / "metrics.jsonl").read_text()
    (victim / "summary.json").unlink()
    (victim / "metrics.jsonl").write_text(before + '{"round": 99}\n')
    calls.clear()
    capsys.readouterr()
    assert cli.run_sweep(_parse(["sweep", str(grid_path), "--out", str(out), "--quiet"])) == 0
    assert (
        "run 2/4 silo/base/seed-2: resuming from its newest checkpoint" in capsys.readouterr().err
    )
    assert calls == []
    # Resumed cleanly: the metrics file holds one line per round, and the results are the
    # same as the first time.
    assert _untimed((victim / "metrics.jsonl").read_text()) == _untimed(before)
    again = json.loads((victim / "summary.json").read_text())
    for key in ("knn_acc", "linear_probe_acc", "uniformity_global"):
        assert again[key] == pytest.approx(summaries[("base", 2)][key], rel=1e-5)


@pytest.mark.slow
def test_a_sweep_resumes_an_interrupted_run_to_the_same_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An interrupted run goes on from its newest checkpoint and ends bit for bit as it would
    have (CPU, same thread count)."""
    rows = '[[rows]]\nname = "base"\nmethod = "fedalignuniform"\n'
    tiny = [*TINY, "federation.rounds=3", "checkpoint.every=1", "checkpoint.keep=3", "threads=1"]
    grid_path = write_grid(tmp_path, seeds=(1,), rows=rows, overrides=tiny)
    out = tmp_path / "sweep"
    assert cli.run_sweep(_parse(["sweep", str(grid_path), "--out", str(out), "--quiet"])) == 0
    run = out / "silo" / "base" / "seed-1"
    model = (run / "model.safetensors").read_bytes()
    summary = json.loads((run / "summary.json").read_text())
    metrics = (run / "metrics.jsonl").read_text()
    # Interrupted during round 3: its checkpoint and the run's final files are not there yet.
    shutil.rmtree(run / "checkpoints" / "round-000003")
    (run / "summary.json").unlink()
    (run / "model.safetensors").unlink()
    capsys.readouterr()
    assert cli.run_sweep(_parse(["sweep", str(grid_path), "--out", str(out)])) == 0
    err = capsys.readouterr().err
    assert "run 1/1 silo/base/seed-1: resuming from its newest checkpoint" in err, err
    assert f"resuming {run} after round 2 of 3" in err, err
    assert "round 1/3" not in err and "round 3/3" in err, err
    assert (run / "model.safetensors").read_bytes() == model
    assert _untimed((run / "metrics.jsonl").read_text()) == _untimed(metrics)
    again = json.loads((run / "summary.json").read_text())
    for key in ("knn_acc", "linear_probe_acc", "uniformity_global", "rounds"):
        assert again[key] == summary[key], key


def _untimed(jsonl: str) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"} for line in jsonl.splitlines()
    ]


# ----------------------------------------------------------------------------- issue 17


def test_a_dry_run_reads_no_data(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`sweep paper-main --dry-run` must not look for (or download) CIFAR."""

    def no_data(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a dry run read data")

    # The sweep's modules are imported (above) before the data readers are replaced in every
    # fedssd module that holds them, wherever it imported them from.
    modules = [m for n, m in sys.modules.items() if n.startswith("fedssd.") and m is not None]
    for module in modules:
        for name in ("prepare_data", "load_data"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_data)
    _no_training(monkeypatch)
    monkeypatch.chdir(GRIDS.parents[1])  # the paper grids' split files are read from the root
    args = _parse(["sweep", str(GRIDS / "paper-main.toml"), "--out", str(tmp_path), "--dry-run"])
    assert cli.run_sweep(args) == 0
    out = capsys.readouterr().out
    assert "72 runs checked" in out and "reads no data" in out
    for row in ("FedX", "L-DAWA", "FedDecorr", "FedU2", "FedAlignUniform", "SSD"):
        assert f"/c10-silo/{row}/seed-17" in out, row


@pytest.mark.slow
def test_quiet_sweep_prints_no_lines_of_its_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid_path = write_grid(
        tmp_path,
        seeds=(1,),
        rows='[[rows]]\nname = "base"\nmethod = "fedalignuniform"\n',
        extra='columns = ["finetune:0.1"]',
    )
    out = tmp_path / "sweep"
    assert cli.run_sweep(_parse(["sweep", str(grid_path), "--out", str(out), "--quiet"])) == 0
    err = capsys.readouterr().err
    assert err.strip(), "the sweep's own lines are still printed"
    assert all(line.startswith("[sweep]") for line in err.strip().splitlines()), err


# ----------------------------------------------------------------------------- paper numbers

PAPER_ROWS = (
    '[[rows]]\nname = "base"\nmethod = "fedalignuniform"\n'
    "[rows.paper]\nsilo = { linear_probe_acc = 82.5, knn_acc = 40 }\n\n"
    '[[rows]]\nname = "+PD"\nmethod = "ssd"\n'
)


def test_paper_numbers_parse_and_render(tmp_path: Path) -> None:
    grid = grids.load_grid(write_grid(tmp_path, seeds=(1, 2, 3), rows=PAPER_ROWS))
    base, plus = grid.rows
    assert base.paper_value("silo", "linear_probe_acc") == 82.5
    assert base.paper_value("silo", "knn_acc") == 40.0
    assert base.paper_value("silo", "finetune:0.1") is None and plus.paper == ()
    records = _records({("silo", "base"): [0.80, 0.82, 0.84], ("silo", "+PD"): [0.81, 0.85, 0.83]})
    table = tables.render_table(grid, records)
    # Measured LP mean 82.00 vs the paper's 82.50: -0.50; kNN 41.00 vs 40: +1.00.
    cells = _cells(table, "base")
    assert cells[2] == "82.00 ± 2.00 (paper 82.50, Δ -0.50)"
    assert cells[3] == "41.00 ± 1.00 (paper 40.00, Δ +1.00)"
    assert _cells(table, "+PD")[2] == "**83.00 ± 2.00**"  # no published number: none shown
    assert "X is the number the paper publishes" in table
    # A cell with no finished run shows the published number alone.
    assert _cells(tables.render_table(grid, []), "base")[2] == "n/a (paper 82.50)"
    # Grids without published numbers say nothing about them.
    plain = grids.load_grid(write_grid(tmp_path / "plain", seeds=(1, 2, 3)))
    assert "paper" not in tables.render_table(plain, records)


@pytest.mark.parametrize(
    ("paper", "message"),
    [
        ("cross = { linear_probe_acc = 80.0 }", r"paper names setting 'cross', which is not one"),
        ("silo = { uniformity_global = 3.8 }", r"column 'uniformity_global', which is not one"),
        ('silo = { linear_probe_acc = "80" }', r"paper\.silo\.linear_probe_acc must be a finite"),
        ("silo = { linear_probe_acc = nan }", r"must be a finite number"),
        ("silo = 80.0", r"paper\.silo must be a table of column -> number"),
    ],
)
def test_paper_numbers_are_checked(tmp_path: Path, paper: str, message: str) -> None:
    rows = f'[[rows]]\nname = "base"\nmethod = "fedalignuniform"\n[rows.paper]\n{paper}\n'
    with pytest.raises(ConfigError, match=message):
        grids.load_grid(write_grid(tmp_path, rows=rows))


def test_paper_grids_carry_the_published_numbers() -> None:
    """Spot checks against the paper's tables (Fang et al., ICCV 2025: main, ablation, transfer)."""
    main = grids.load_grid(GRIDS / "paper-main.toml")
    rows = {r.name: r for r in main.rows}
    assert rows["SSD"].paper_value("c10-silo", "linear_probe_acc") == 81.32
    assert rows["SSD"].paper_value("c10-device", "finetune:0.01") == 57.77
    assert rows["FedAlignUniform"].paper_value("c100-device", "finetune:0.1") == 36.64
    assert rows["L-DAWA"].paper_value("c100-silo", "linear_probe_acc") == 56.90
    assert rows["FedX"].paper_value("c10-device", "finetune:0.1") == 73.24
    # Every row x setting has LP, FT 1% and FT 10%, and nothing for kNN.
    for row in main.rows:
        for setting in main.settings:
            for spec in ("linear_probe_acc", "finetune:0.01", "finetune:0.1"):
                assert row.paper_value(setting.name, spec) is not None, (row.name, setting.name)
            assert row.paper_value(setting.name, "knn_acc") is None
    ablation = {r.name: r for r in grids.load_grid(GRIDS / "paper-ablation.toml").rows}
    assert ablation["+DSR"].paper_value("c10-silo", "uniformity_global") == 3.81
    assert ablation["+PD"].paper_value("c10-silo", "finetune:0.1") == 80.71
    transfer = {r.name: r for r in grids.load_grid(GRIDS / "paper-transfer.toml").rows}
    assert transfer["SSD"].paper_value("tin-to-c10", "linear-on:cifar10@effective_rank") == 98.45
    assert transfer["FedAlignUniform"].paper_value("c100-to-c10", "linear-on:cifar10") == 77.66

    # The main table rendered from fake records: SSD's cross-silo CIFAR-10 LP measured at
    # 80.00, 81.00, 82.00 % (mean 81.00, std 1.00) sits 0.32 points under the paper's 81.32.
    records = [
        {"setting": "c10-silo", "row": "SSD", "method": "ssd", "seed": seed, "linear_probe_acc": v}
        for seed, v in zip(main.seeds, (0.80, 0.81, 0.82), strict=True)
    ]
    table = tables.render_table(main, records)
    assert _cells(table, "SSD")[2] == "**81.00 ± 1.00** (paper 81.32, Δ -0.32)"
    assert _cells(table, "FedX")[2] == "n/a (paper 78.40)"


def test_a_run_made_before_a_later_option_existed_is_reused(tmp_path: Path) -> None:
    """A finished run whose config.toml predates an option (here SSD's dsr_dims and
    federation.drop_last) ran with its default: the sweep reuses it; another value is refused."""
    import tomli_w

    config = load_config(SMOKE)
    assert config.method.options["dsr_dims"] == 0
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    run = planning.PlannedRun("s", "r", "ssd", 17, config, run_dir)
    old = config_module.to_dict(config)
    del old["method"]["dsr_dims"], old["federation"]["drop_last"]
    (run_dir / "config.toml").write_text(tomli_w.dumps(old))
    planning._check_same_config(run)
    old["method"]["dsr_dims"] = 5
    (run_dir / "config.toml").write_text(tomli_w.dumps(old))
    with pytest.raises(ConfigError, match="different config"):
        planning._check_same_config(run)
