"""``fedssd report``: the pure helpers against hand computations, and every figure of a real
tiny run and a real tiny sweep."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedssd import cli
from fedssd.api import train
from fedssd.errors import DataError
from fedssd.experiments import execute as execution
from fedssd.experiments import grid as grids
from fedssd.experiments import plan as planning
from fedssd.experiments import report

pytest.importorskip("matplotlib")

SMOKE = Path(__file__).resolve().parents[2] / "src" / "fedssd" / "configs" / "smoke.toml"
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


@pytest.mark.slow
def test_report_of_a_single_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    train(SMOKE, overrides=TINY, out=run, log=None)
    parser = argparse.ArgumentParser(prog="fedssd")
    cli.add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run), "--samples", "200", "--quiet"])
    assert cli.run_report(args) == 0
    assert "report.md" in capsys.readouterr().out
    text = _check_figures(
        run,
        ["curves-run.png", "partition-run.png", "uniformity-run.png", "embeddings-run-ssd.png"],
    )
    assert "| ssd |" in text  # the final evaluation table
    assert "200 training images" in text  # the embedding sample's size
    # The per-site table: one row per client, as summary.json has it.
    summary = json.loads((run / "summary.json").read_text())
    table = text.split("## Sites", 1)[1]
    assert table.count("\n| ") == 2 + 4  # heading, rule and the 4 clients
    for site in summary["sites"]:
        assert site["sampled"] == site["aggregated"] == 2 and site["images"] > 0
        counts = f"| {site['client']} | {site['images']} | {site['labelled']} | 2 | 2 | 0 | 0 |"
        assert counts in table
        assert f"{site['uniformity']:.3f}" in table
    # A run written before summary.json carried the table gets the same one from its files.
    del summary["sites"]
    (run / "summary.json").write_text(json.dumps(summary))
    again = report.render_markdown(run, "run", report.find_runs(run)[1], [])
    assert again.split("## Sites")[1].strip() == table.split("### ")[0].strip()


@pytest.mark.slow
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
    grid = grids.load_grid(grid_path)
    out = tmp_path / "sweep"
    execution.execute(grid, out, planning.plan(grid, out), log=None, run_log=None)
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


# ----------------------------------------------------------------------------- issue 17


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The matplotlib Figures the report draws, kept open instead of saved."""
    kept: list[Any] = []
    monkeypatch.setattr(report, "_save", lambda fig, _path: kept.append(fig))
    yield kept
    import matplotlib.pyplot as plt

    for fig in kept:
        plt.close(fig)


def _axes_by_title(fig: Any) -> dict[str, Any]:
    return {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_visible()}


def test_curves_use_the_tables_sign_and_show_flat_terms_honestly(
    figures: list[Any], tmp_path: Path
) -> None:
    history = [
        {"round": 1, "loss": 1.0, "loss_uniform": -2.1, "loss_dsr": 0.0869},
        {"round": 2, "loss": 0.5, "loss_uniform": -2.6, "loss_dsr": 0.0872},
    ]
    report.curves_figure({"SSD": [history]}, tmp_path / "c.png", "curves")
    axes = _axes_by_title(figures[0])
    uniform = axes["-L_unif"]
    assert "-L_unif" in uniform.get_ylabel() and "higher is better" in uniform.get_ylabel()
    assert uniform.lines[0].get_ydata().tolist() == [2.1, 2.6]  # the tables' sign
    dsr = axes["DSR loss"]
    bottom, top = dsr.get_ylim()
    assert bottom <= 0.0 < 0.0872 <= top  # its scale, not its rounding noise
    assert "0.0869 to 0.0872" in dsr.get_title()
    figures[0].canvas.draw()
    assert dsr.yaxis.get_major_formatter().get_offset() == ""
    # A term that moves keeps the automatic range.
    low, high = axes["total loss"].get_ylim()
    assert low > 0.3 and high < 1.2


def test_heatmap_cells_carry_their_values(figures: list[Any], tmp_path: Path) -> None:
    matrix = np.array([[3.5, 1.25], [1.25, 3.0]])
    report.uniformity_figure({"h": {"SSD": matrix}}, tmp_path / "u.png", "u")
    texts = [t.get_text() for t in figures[0].axes[0].texts]
    assert sorted(texts) == ["1.25", "1.25", "3.00", "3.50"]


def test_embedding_legends_name_the_classes(figures: list[Any], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sphere = report.sphere_map(rng.normal(size=(60, 8)))
    labels = np.arange(60) % 10
    report.embedding_figure(
        {"h": sphere}, labels % 3, labels, tmp_path / "e.png", "e", dataset="fashion_mnist"
    )
    legends = [ax.get_legend() for ax in figures[0].axes if ax.get_legend() is not None]
    by_title = {legend.get_title().get_text(): legend for legend in legends}
    names = [t.get_text() for t in by_title["class"].get_texts()]
    assert names[0] == "T-shirt/top" and names[-1] == "Ankle boot" and len(names) == 10
    assert [t.get_text() for t in by_title["client"].get_texts()] == ["0", "1", "2"]
    assert report.class_names("cifar10", 10)[0] == "airplane"
    assert report.class_names("npz", 3) == ["0", "1", "2"]


@pytest.mark.slow
def test_titles_do_not_repeat_the_method(figures: list[Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(SMOKE, overrides=TINY, out=run, log=None)
    report.build_report(run, embedding_samples=100)
    titles = [fig.get_suptitle() for fig in figures]
    embedding = next(t for t in titles if "embeddings" in t)
    assert embedding.startswith("ssd, seed 17") and "ssd (ssd" not in embedding
    assert report.row_title("+PD", "ssd") == "+PD (ssd)"
