"""``fedssd report``: the pure helpers against hand computations, and every figure of a real
tiny run and a real tiny sweep."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest

from fedssd import report, sweep
from fedssd.api import train
from fedssd.errors import DataError

pytest.importorskip("matplotlib")

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
TINY = [
    "data.train_subset=300",
    "data.test_subset=150",
    "federation.rounds=2",
    "evaluation.linear_epochs=3",
    "evaluation.metrics_samples=200",
    "evaluation.metrics_per_client=40",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_band_is_mean_min_max_over_seeds() -> None:
    histories = [
        [{"round": 1, "loss": 1.0}, {"round": 2, "loss": 3.0, "knn_acc": 0.5}],
        [{"round": 1, "loss": 3.0}, {"round": 2, "loss": 5.0, "knn_acc": 0.7}],
        [{"round": 1, "loss": 5.0}],  # a shorter (interrupted) seed
    ]
    rounds, mean, low, high = report.band(histories, "loss")
    assert rounds.tolist() == [1, 2]
    assert mean.tolist() == [3.0, 4.0] and low.tolist() == [1.0, 3.0]
    assert high.tolist() == [5.0, 5.0]
    rounds, mean, _, _ = report.band(histories, "knn_acc")
    assert rounds.tolist() == [2] and mean.tolist() == pytest.approx([0.6])


def test_curve_keys_order() -> None:
    history = [
        {"round": 1, "clients": [0], "loss_pd": 1.0, "knn_acc": 0.1, "loss": 0.0, "seconds": 2.0},
        {"round": 2, "loss_align": 1.0, "uniformity_global": 3.0, "method": "ssd"},
    ]
    assert report.curve_keys([history]) == [
        "loss",
        "loss_align",
        "loss_pd",
        "knn_acc",
        "uniformity_global",
    ]


def _unit(longitude: np.ndarray, latitude: np.ndarray) -> np.ndarray:
    return np.stack(
        [
            np.cos(latitude) * np.cos(longitude),
            np.cos(latitude) * np.sin(longitude),
            np.sin(latitude),
        ],
        axis=1,
    )


def test_sphere_map_keeps_opposite_directions_opposite() -> None:
    # Normalised: e1 and -e2; centred: +-(e1 + e2) / 2, one direction and its opposite.
    features = np.array([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, -3.0, 0.0, 0.0, 0.0]] * 3)
    sphere = report.sphere_map(features)
    points = _unit(sphere.longitude, sphere.latitude)
    assert np.allclose(np.linalg.norm(points, axis=1), 1.0)
    assert points[0] @ points[1] == pytest.approx(-1.0)
    assert points[0] @ points[2] == pytest.approx(1.0)
    assert sphere.captured == pytest.approx(1.0)


def test_sphere_map_on_three_dimensional_points_is_a_rotation() -> None:
    # Unit vectors in 3-D whose mean is zero: the map only rotates them, so angles are kept.
    rng = np.random.default_rng(0)
    half = rng.normal(size=(50, 3))
    half /= np.linalg.norm(half, axis=1, keepdims=True)
    x = np.concatenate([half, -half])
    sphere = report.sphere_map(x * rng.uniform(0.5, 2.0, size=(100, 1)))
    points = _unit(sphere.longitude, sphere.latitude)
    assert np.allclose(points @ points.T, x @ x.T, atol=1e-9)
    assert np.all(np.abs(sphere.latitude) <= np.pi / 2)


def _check_figures(folder: Path, expected: list[str]) -> str:
    figures = sorted(p.name for p in (folder / report.FIGURES).iterdir())
    assert figures == sorted(expected)
    text = (folder / "report.md").read_text(encoding="utf-8")
    for name in expected:
        data = (folder / report.FIGURES / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert f"({report.FIGURES}/{name})" in text
    return text


def test_report_of_a_single_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    train(SMOKE, overrides=TINY, out=run, log=None)
    parser = argparse.ArgumentParser(prog="fedssd")
    report.add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run), "--samples", "200", "--quiet"])
    assert report.run_report(args) == 0
    assert "report.md" in capsys.readouterr().out
    text = _check_figures(
        run,
        ["curves-run.png", "partition-run.png", "uniformity-run.png", "embeddings-run-ssd.png"],
    )
    assert "| ssd |" in text  # the final evaluation table
    assert "200 training images" in text  # the embedding sample's size


def test_report_of_a_tiny_sweep(tmp_path: Path) -> None:
    grid_path = tmp_path / "grid.toml"
    grid_path.write_text(
        f'base = "{os.path.relpath(SMOKE, tmp_path)}"\n'
        f"seeds = [1, 2]\n"
        f'baseline = "base"\n'
        f"overrides = {TINY!r}\n".replace("'", '"')
        + '[[settings]]\nname = "silo"\n\n'
        + '[[rows]]\nname = "base"\nmethod = "fedalignuniform"\n\n'
        + '[[rows]]\nname = "SSD"\nmethod = "ssd"\n',
        encoding="utf-8",
    )
    grid = sweep.load_grid(grid_path)
    out = tmp_path / "sweep"
    sweep.execute(grid, out, sweep.plan(grid, out), log=None, run_log=None)
    path = report.build_report(out, embedding_samples=150)
    text = _check_figures(
        out,
        [
            "curves-silo.png",
            "partition-silo.png",
            "uniformity-silo.png",
            "embeddings-silo-base.png",
            "embeddings-silo-SSD.png",
        ],
    )
    assert path == out / "report.md"
    assert "## Table" in text and "| SSD | ssd |" in text and "## Setting `silo`" in text
    assert "mean over 2 seeds and the band their minimum to maximum" in text


def test_report_refuses_a_folder_without_runs(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        report.build_report(tmp_path)
    assert "holds no run" in str(caught.value) and "\n" not in str(caught.value)
