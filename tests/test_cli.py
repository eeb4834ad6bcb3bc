"""The command line: help, and one sentence with exit code 2 for every user error."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedssd.cli import build_parser, main
from fedssd.experiments.tables import format_table

SMOKE = str(Path(__file__).resolve().parents[1] / "src" / "fedssd" / "configs" / "smoke.toml")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_help_names_every_command_and_option() -> None:
    parser = build_parser()
    text = parser.format_help()
    for command in ("train", "compare", "data", "methods", "eval", "sweep", "report"):
        assert command in text
    sub = subprocess.run(
        [sys.executable, "-m", "fedssd.cli", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--config", "--set", "--out", "--overwrite", "--quiet", "--verbose", "--resume"):
        assert option in sub.stdout


def test_methods_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["methods"], capsys)
    assert code == 0
    assert "ssd" in out and "fedalignuniform" in out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "--config", "absent.toml"], "does not exist"),
        (["train", "--config", SMOKE, "--set", "federation.num_clients=0"], "num_clients"),
        (["train", "--config", SMOKE, "--set", "data.alpha=-0.5"], "data.alpha must be > 0"),
        (["train", "--config", SMOKE, "--set", "federation.fraction=2"], "fraction"),
        (["train", "--config", SMOKE, "--set", "method.name=nope"], "unknown method"),
        (["train", "--config", SMOKE, "--set", "federation.bogus=1"], "unknown config key"),
        (["train", "--config", SMOKE, "--set", "federation.rounds=x"], "must be an integer"),
        (["train", "--config", SMOKE, "--set", "noequals"], "key=value"),
        (["train"], "--config"),
        (["frobnicate"], "invalid choice"),
        (["data", "imagenet"], "unknown dataset"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    try:
        code, _, err = run_cli(
            [*args, "--out", str(tmp_path / "run")]
            if args[0] == "train" and len(args) > 1
            else args,
            capsys,
        )
    except SystemExit as exit_:
        code, err = int(exit_.code or 0), capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert "Traceback" not in err


def test_missing_data_is_one_sentence(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(
        [
            "train",
            "--config",
            SMOKE,
            "--out",
            str(tmp_path / "run"),
            "--set",
            "data.name=cifar10",
            "--set",
            "data.download=false",
            "--set",
            f"data.root={tmp_path / 'empty'}",
        ],
        capsys,
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "cifar" in err.lower()
    npz_code, _, npz_err = run_cli(
        [
            "train",
            "--config",
            SMOKE,
            "--out",
            str(tmp_path / "run2"),
            "--set",
            "data.name=npz",
            "--set",
            f"data.path={tmp_path / 'absent.npz'}",
        ],
        capsys,
    )
    assert npz_code == 2 and len(npz_err.strip().splitlines()) == 1


def test_an_existing_run_is_not_overwritten(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"knn_acc": 0.5}')
    code, _, err = run_cli(["train", "--config", SMOKE, "--out", str(out)], capsys)
    assert code == 2 and "already holds a run" in err
    assert (out / "summary.json").read_text() == '{"knn_acc": 0.5}'


@pytest.mark.slow
def test_console_script_exits_2_on_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation]\nrounds = -1\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedssd.cli",
            "train",
            "--config",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedssd: error: federation.rounds must be at least 1, not -1."
    assert not (tmp_path / "o").exists()


def test_an_interrupted_command_says_how_it_continues_and_only_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedssd import cli

    def interrupted(_args: object) -> int:
        with cli.resumable("continue with: outer"), cli.resumable("continue with: inner"):
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert main(["methods"]) == 128 + signal.SIGINT.value
    err = capsys.readouterr().err
    assert "stopped by SIGINT" in err and "fedssd: continue with: inner" in err
    assert "outer" not in err

    def terminated(_args: object) -> int:
        with cli.resumable("continue with: again"):
            raise cli.Stopped(signal.SIGTERM.value)

    monkeypatch.setattr(cli, "_dispatch", terminated)
    assert main(["methods"]) == 128 + signal.SIGTERM.value
    assert "fedssd: continue with: again" in capsys.readouterr().err

    # A later command interrupted outside any resumable part says nothing of the earlier ones.
    def plain(_args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", plain)
    assert main(["methods"]) == 128 + signal.SIGINT.value
    assert "continue with" not in capsys.readouterr().err


def test_table_formats_percentages_and_missing_values() -> None:
    table = format_table(
        {"ssd": {"linear_probe_acc": 0.8123, "knn_acc": 0.7}, "base": {"linear_probe_acc": 0.5}}
    )
    lines = table.splitlines()
    assert lines[0].startswith("| method | LP acc % | kNN acc %")
    assert "| ssd | 81.23 | 70.00 |" in lines[2]
    assert "| base | 50.00 | n/a |" in lines[3]


def test_a_run_that_fails_before_training_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # projector distillation needs equal widths: refused when the method is built, after the data
    code, _, err = run_cli(
        ["train", "--config", SMOKE, "--out", str(out), "--set", "model.projector_out=7"], capsys
    )
    assert code == 2 and "projector distillation needs" in err
    assert not out.exists()


def test_compare_checks_every_output_folder_first(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    (out / "fedalignuniform").mkdir(parents=True)
    (out / "fedalignuniform" / "metrics.jsonl").write_text("{}\n")
    code, _, err = run_cli(["compare", "--config", SMOKE, "--out", str(out)], capsys)
    assert code == 2 and "already holds a run" in err
    assert not (out / "ssd").exists()


@pytest.mark.slow
def test_progress_lines_per_round_and_per_client(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = run_cli(
        [
            "train",
            "--config",
            SMOKE,
            "--out",
            str(tmp_path / "run"),
            "--verbose",
            "--set",
            "federation.rounds=1",
            "--set",
            "evaluation.linear_epochs=2",
        ],
        capsys,
    )
    assert code == 0
    assert "[ssd] round 1/1 client 1/4 (id 0)" in err
    assert "[ssd] round 1/1 | loss" in err and "eta" in err
    assert "| ssd |" in out and "Traceback" not in err


def test_data_command_finds_or_reports(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(["data", "fashion_mnist", "--root", str(tmp_path)], capsys)
    assert code == 0 and "fashion" in out  # Debian's copy (installed by `make data`)
    code, out, err = run_cli(["data", "cifar10", "--root", str(tmp_path)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--download" in err


@pytest.mark.slow
def test_compare_runs_other_methods_from_an_ssd_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from fedssd import config as config_module
    from fedssd.runs.resolve import load_config

    saved = tmp_path / "config.toml"  # as a run writes it: every SSD option spelled out
    saved.write_text(
        config_module.dumps(load_config(SMOKE, overrides=["method.uniformity_weight=0.5"]))
    )
    code, out, err = run_cli(
        [
            "compare",
            "--config",
            str(saved),
            "--methods",
            "fedalignuniform",
            "--quiet",
            "--out",
            str(tmp_path / "cmp"),
            "--set",
            "federation.rounds=1",
            "--set",
            "evaluation.linear_epochs=2",
        ],
        capsys,
    )
    assert code == 0, err
    assert "| fedalignuniform |" in out
    resolved = load_config(tmp_path / "cmp" / "fedalignuniform" / "config.toml")
    assert dict(resolved.method.options) == {"uniformity_weight": 0.5, "uniformity_t": 2.0}


# ----------------------------------------------------------------------------- issue 17


@pytest.mark.slow
def test_a_reader_closing_the_pipe_gives_no_traceback() -> None:
    """`fedssd methods | head -2`: the reader has gone before fedssd writes."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will read: every write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "fedssd.cli", "methods"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert result.stderr == ""
    assert result.returncode == 141


@pytest.mark.slow
def test_every_run_command_takes_threads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    parser = build_parser()
    for command in (["train"], ["compare", "--config", SMOKE], ["sweep", "g.toml"]):
        assert parser.parse_args([*command, "--threads", "1"]).threads == 1
    assert parser.parse_args(["eval", "--run", "r", "--protocol", "knn", "--threads", "1"]).threads
    code, _, err = run_cli(
        [
            *("train", "--config", SMOKE, "--out", str(tmp_path / "run"), "--quiet"),
            *("--threads", "1", "--set", "federation.rounds=1"),
            *("--set", "evaluation.linear_epochs=2"),
        ],
        capsys,
    )
    assert code == 0, err
    assert "threads = 1" in (tmp_path / "run" / "config.toml").read_text()
    code, _, err = run_cli(["train", "--config", SMOKE, "--threads", "-2"], capsys)
    assert code == 2 and "threads must be >= 0" in err


@pytest.mark.slow
def test_compare_keeps_its_table_and_report_reads_the_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    code, printed, err = run_cli(
        [
            *("compare", "--config", SMOKE, "--methods", "ssd", "fedalignuniform", "--quiet"),
            *("--out", str(out), "--set", "federation.rounds=1", "--set", "data.train_subset=300"),
            *("--set", "evaluation.linear_epochs=2", "--set", "evaluation.metrics_samples=100"),
        ],
        capsys,
    )
    assert code == 0, err
    table = (out / "table.md").read_text()
    assert table.strip() in printed
    assert "| ssd |" in table and "| fedalignuniform |" in table
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["ssd", "fedalignuniform"]
    summary = json.loads((out / "ssd" / "summary.json").read_text())
    assert float(rows[0]["knn_acc"]) == summary["knn_acc"]
    code, printed, err = run_cli(["report", str(out), "--quiet", "--samples", "100"], capsys)
    assert code == 0, err
    text = (out / "report.md").read_text()
    assert "| ssd |" in text and "| fedalignuniform |" in text
    assert (out / "figures" / "curves-compare.png").is_file()
    assert (out / "figures" / "embeddings-compare-fedalignuniform.png").is_file()
