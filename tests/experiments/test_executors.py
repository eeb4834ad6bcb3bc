"""Grids at scale (issue 15): runs at once in local processes, through submitit's local
executor and on a local Ray instance; one table, resumable, a failed run recorded while the
others go on."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from test_sweep import FakeTrain, write_grid

import fedssd.api
from fedssd import cli
from fedssd.errors import ConfigError
from fedssd.experiments import execute as execution
from fedssd.experiments import executors
from fedssd.experiments import grid as grids
from fedssd.experiments import plan as planning


def _rows(out: Path) -> list[tuple[str, str]]:
    with (out / "results.csv").open(encoding="utf-8") as handle:
        return [(r["row"], r["seed"]) for r in csv.DictReader(handle)]


def _summaries(out: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.parent.relative_to(out)): json.loads(p.read_text())
        for p in sorted(out.glob("*/*/seed-*/summary.json"))
    }


def test_a_failed_run_is_recorded_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTrain()

    def flaky(config: Any, **kwargs: Any) -> None:
        if config.seed == 2 and config.method.name == "fedalignuniform":
            raise RuntimeError("CUDA out of memory")
        fake(config, **kwargs)

    monkeypatch.setattr(fedssd.api, "train", flaky)
    grid = grids.load_grid(write_grid(tmp_path))
    out = tmp_path / "sweep"
    lines: list[str] = []
    records = execution.execute(grid, out, planning.plan(grid, out), log=lines.append, run_log=None)
    assert len(records) == 3 and len(fake.calls) == 3
    failed = json.loads((out / grids.FAILED_FILE).read_text())
    assert [(f["row"], f["seed"]) for f in failed] == [("base", 2)]
    assert failed[0]["error"] == "RuntimeError: CUDA out of memory"
    error_file = out / "silo" / "base" / "seed-2" / executors.ERROR_FILE
    assert "CUDA out of memory" in error_file.read_text()
    assert any("FAILED" in line and "the others go on" in line for line in lines)
    # Run again: only the failed run is retried, and once it succeeds its record is cleared.
    monkeypatch.setattr(fedssd.api, "train", fake)
    fake.calls.clear()
    execution.execute(grid, out, planning.plan(grid, out), log=None, run_log=None)
    assert [c[0] for c in fake.calls] == [out / "silo" / "base" / "seed-2"]
    assert not (out / grids.FAILED_FILE).exists() and not error_file.exists()


def test_threads_and_devices() -> None:
    assert executors.threads_per_job(2, cores=2) == 1
    assert executors.threads_per_job(1, cores=2) == 2
    assert executors.threads_per_job(4, cores=2) == 1
    assert executors.parse_devices("cuda:0, cuda:1") == ("cuda:0", "cuda:1")
    with pytest.raises(ConfigError, match="cuda:N"):
        executors.parse_devices("gpu0")
    with pytest.raises(ConfigError, match="unknown executor"):
        executors.make_executor("dask", jobs=1, folder=Path("x"))
    assert isinstance(
        executors.make_executor("local", jobs=1, folder=Path("x")), executors.SerialExecutor
    )
    assert isinstance(
        executors.make_executor("local", jobs=2, folder=Path("x")), executors.ProcessExecutor
    )


def _real_grid(tmp_path: Path) -> tuple[grids.Grid, Path]:
    grid = grids.load_grid(write_grid(tmp_path, seeds=(1,)))
    return grid, tmp_path / "sweep"


@pytest.fixture(scope="module")
def serial_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The tiny grid run one after another in this process (one thread, as the workers)."""
    folder = tmp_path_factory.mktemp("serial")
    grid, out = _real_grid(folder)
    execution.execute(grid, out, planning.plan(grid, out), log=None, run_log=None)
    return _summaries(out)


def _same_results(got: dict[str, dict[str, Any]], want: dict[str, dict[str, Any]]) -> None:
    assert got.keys() == want.keys() and len(got) == 2
    for key in want:
        for metric in ("knn_acc", "linear_probe_acc", "uniformity_global"):
            assert got[key][metric] == pytest.approx(want[key][metric], rel=1e-5), (key, metric)


@pytest.mark.slow
def test_two_local_processes_give_the_serial_results(
    tmp_path: Path, serial_reference: dict[str, dict[str, Any]]
) -> None:
    grid, out = _real_grid(tmp_path)
    lines: list[str] = []
    runs = planning.plan(grid, out)
    executor = executors.ProcessExecutor(2, threads=1)
    execution.execute(grid, out, runs, log=lines.append, run_log=None, executor=executor)
    _same_results(_summaries(out), serial_reference)
    assert _rows(out) == [("base", "1"), ("+PD", "1")]
    assert sum("of this sweep done" in line for line in lines) == 2
    # Resumable as before: finished by a worker, skipped here.
    lines.clear()
    execution.execute(grid, out, planning.plan(grid, out), log=lines.append, run_log=None)
    assert sum("finished earlier, skipped" in line for line in lines) == 2


@pytest.mark.slow
def test_submitit_local_executor(
    tmp_path: Path, serial_reference: dict[str, dict[str, Any]]
) -> None:
    grid, out = _real_grid(tmp_path)
    executor = executors.SubmititExecutor(
        tmp_path / "jobs", cluster="local", jobs=2, threads=1, poll=0.5
    )
    execution.execute(
        grid, out, planning.plan(grid, out), log=None, run_log=None, executor=executor
    )
    _same_results(_summaries(out), serial_reference)
    assert list((tmp_path / "jobs").glob("*_result.pkl"))  # submitit ran the jobs


@pytest.mark.slow
def test_ray_local_instance(tmp_path: Path, serial_reference: dict[str, dict[str, Any]]) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        grid, out = _real_grid(tmp_path)
        executor = executors.RayExecutor(threads=1)
        execution.execute(
            grid, out, planning.plan(grid, out), log=None, run_log=None, executor=executor
        )
    finally:
        ray.shutdown()
    _same_results(_summaries(out), serial_reference)


@pytest.mark.slow
def test_sweep_cli_limit_and_tracking_grouped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    fake = FakeTrain()
    monkeypatch.setattr(fedssd.api, "train", fake)
    grid_path = write_grid(tmp_path)
    out = tmp_path / "sweep"
    parser = __import__("argparse").ArgumentParser()
    cli.add_sweep_parser(parser.add_subparsers(dest="command"))
    argv = ["sweep", str(grid_path), "--out", str(out), "--quiet", "--limit", "3"]
    assert cli.run_sweep(parser.parse_args([*argv, "--track", "mlflow,wandb"])) == 0
    assert len(fake.calls) == 3
    configs = [fedssd.load_config(path / "config.toml") for path, _ in fake.calls]
    assert {c.tracking.group for c in configs} == {"sweep"}
    assert [c.tracking.run_name for c in configs] == [
        "silo/base/seed-1",
        "silo/base/seed-2",
        "silo/+PD/seed-1",
    ]
    parents = {c.tracking.mlflow_parent_run for c in configs}
    assert len(parents) == 1
    client = MlflowClient(tracking_uri=configs[0].tracking.mlflow_uri)
    assert client.get_run(parents.pop()).info.run_name == grid_path.stem
    # Tracking is not part of a run's identity: the same sweep without --track reuses the runs.
    fake.calls.clear()
    assert cli.run_sweep(parser.parse_args(argv)) == 0
    assert fake.calls == []
