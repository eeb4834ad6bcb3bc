"""The encoder-size benchmark: its extrapolation, and one tiny grid through its command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import encoder_sizes


def test_a_step_is_timed_as_it_is_or_extrapolated_along_a_line() -> None:
    assert encoder_sizes.step_time(0.5, 3.0, timed=64, batch=64) == 3.0
    # 0.1 s fixed + 0.05 s per image: 0.3 s for 4 images, 0.9 s for 16, so 3.3 s for 64.
    assert encoder_sizes.step_time(0.3, 0.9, timed=16, batch=64) == pytest.approx(3.3)
    # Noise that makes the larger batch look cheaper gives no negative cost.
    assert encoder_sizes.step_time(0.4, 0.3, timed=16, batch=64) == pytest.approx(0.4)


@pytest.mark.slow
def test_the_command_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sizes.json"
    argv = ["--encoders", "small_cnn", "--sizes", "8", "16", "--images", "32", "--batch", "8"]
    assert encoder_sizes.main([*argv, "--steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| `small_cnn` |" in printed and "8 px: CPU / wall per round" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [(row["encoder"], row["size"], row["batch_timed"]) for row in rows] == [
        ("small_cnn", 8, 8),
        ("small_cnn", 16, 8),
    ]
    for row in rows:
        # 32 images in batches of 8: four steps a round.
        assert row["cpu_s_per_round"] == pytest.approx(4 * row["cpu_s_per_step"])
        assert row["cpu_s_per_step"] > 0
