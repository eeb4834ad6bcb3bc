"""The packaged grids on the CIFAR-10 photos plan the runs they describe, without reading data."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from fedssd.experiments import grid as grids
from fedssd.experiments import plan as planning
from fedssd.methods import METHODS

ARCHIVE = "../shared/data/cifar10-jpeg.tar.gz"


def _plan(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[planning.PlannedRun]:
    monkeypatch.chdir(tmp_path)  # a packaged grid and its base resolve from any folder
    grid = grids.load_grid(name)
    return planning.plan(grid, tmp_path / name)


def _common(runs: list[planning.PlannedRun], folder: Path) -> None:
    # The cifar10-photos preset underneath: the archive beside the folder the sweep starts in,
    # 10,000 training photos, Dir(0.1).
    for run in runs:
        data = run.config.data
        assert (data.name, data.train_subset) == ("folder", 10_000)
        assert Path(data.path) == (folder / ARCHIVE).resolve()
        assert (data.partition, data.alpha) == ("dirichlet", 0.1)
        assert run.config.model.encoder == "small_cnn" and run.config.model.width == 16


def test_ssd_against_its_base_on_photos_plans_20_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = _plan("photos-ssd-vs-base", tmp_path, monkeypatch)
    _common(runs, tmp_path)
    assert len(runs) == 20
    assert Counter(r.method for r in runs) == {"fedalignuniform": 10, "ssd": 10}
    assert {r.seed for r in runs} == set(range(1, 11))
    for run in runs:
        fed = run.config.federation
        assert (fed.num_clients, fed.fraction, fed.rounds) == (10, 1.0, 40)
        assert run.config.seed == run.seed
    paper = {
        r.name: r.paper_value("silo", "linear_probe_acc")
        for r in grids.load_grid("photos-ssd-vs-base").rows
    }
    assert paper == {"base": 80.84, "SSD": 81.32}  # Fang et al., ICCV 2025, Table 1, CIFAR-10


def test_the_main_table_on_photos_plans_every_method_in_both_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = _plan("photos-main", tmp_path, monkeypatch)
    _common(runs, tmp_path)
    assert len(runs) == len(METHODS) * 2 * 2 == 52
    assert {r.method for r in runs} == set(METHODS)
    for run in runs:
        fed = run.config.federation
        clients = {"silo": (10, 1.0), "device": (50, 0.2)}[run.setting]
        assert (fed.num_clients, fed.fraction, fed.rounds) == (*clients, 10)
        # K = 50 keeps each epoch's last batch (the released protocol; most clients hold
        # fewer than one batch of 128 photos).
        assert not fed.drop_last
    rows = {r.name: r for r in grids.load_grid("photos-main").rows}
    published = {
        "FedAlignUniform": (80.84, 71.28),
        "SSD": (81.32, 71.83),
        "FedX": (78.40, 71.01),
        "L-DAWA": (77.67, 67.65),
        "FedDecorr": (80.13, 71.49),
        "FedU2": (81.01, 71.09),
    }
    for name, row in rows.items():
        cells = (
            row.paper_value("silo", "linear_probe_acc"),
            row.paper_value("device", "linear_probe_acc"),
        )
        assert cells == published.get(name, (None, None)), name


# The photo sweeps whose finished runs are committed (summary, config, metrics, partition of
# each), by grid name.
COMMITTED = {"photos-main": "photos_main", "photos-ssd-vs-base": "photos_ssd_vs_base"}
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "results.md"


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_the_committed_photo_results_are_the_sweeps_own_tables(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committed table.md and results.csv are what the sweep makes of the committed runs,
    and every row of its main table and of its paired differences is in docs/results.md as it
    stands there."""
    from fedssd.cli import main

    committed = RESULTS / COMMITTED[name]
    copy = shutil.copytree(committed, tmp_path / "sweep")
    (copy / "table.md").unlink()
    (copy / "results.csv").unlink()
    monkeypatch.chdir(RESULTS.parents[1])  # sweep.json names the grid from the repository
    assert main(["sweep", name, "--tables-only", "--quiet", "--out", str(copy)]) == 0
    for written in ("table.md", "results.csv"):
        assert (copy / written).read_text() == (committed / written).read_text(), written
    docs = DOCS.read_text(encoding="utf-8")
    table = (committed / "table.md").read_text().partition("Per-seed differences")[0]
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith(("| row ", "| --- "))
    ]
    assert rows
    missing = [row for row in rows if row not in docs]
    assert not missing, f"docs/results.md lacks {len(missing)} rows of {name}'s table: {missing}"
