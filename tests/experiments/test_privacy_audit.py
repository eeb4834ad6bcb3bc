"""``fedssd privacy-audit``: the one-run audit of a DP run has power without noise and stays
below the accountant's epsilon with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import special

from fedssd.cli import main
from fedssd.experiments.audit import privacy_audit
from helpers import one_sentence

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "src" / "fedssd" / "configs" / "smoke.toml")
TINY = [
    "data.train_subset=600",
    "data.test_subset=200",
    "model.width=4",
    "model.projector_hidden=32",
    "federation.rounds=2",
    "federation.batch_size=32",
    "privacy.dp=fixed",
    "privacy.clip_norm=1",
    # The noise from the run seed, so that a test's outcome is fixed by its seeds (the auditor
    # does not use it: the run seed is not the audit's).
    "privacy.reproducible_noise=true",
]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.slow
def test_without_noise_the_audit_guesses_every_canary_right(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "audit.json"
    args = ["privacy-audit", SMOKE, *_sets([*TINY, "privacy.noise_multiplier=0"])]
    args += ["--canaries", "1000", "--audit-seed", "1", "--quiet", "--json", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "empirical epsilon lower bound" in printed and "accountant's epsilon" in printed
    report = json.loads(out.read_text())
    assert report["accountant_epsilon"] is None  # no noise: infinite
    # Clipping alone hides nothing: the best candidate (250 guesses per side) is all right, and
    # the bound is the most 500 right guesses can show at 95 % (5 candidates, Bonferroni),
    # less the small delta term.
    assert report["correct"] == report["guesses"] == 500
    most = float(special.logit((0.05 / 5) ** (1 / 500)))
    assert most - 0.1 < report["epsilon_lower_bound"] <= most
    assert report["epsilon_lower_bound"] > 4.5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sets", "epsilon"),
    [
        (["privacy.target_epsilon=4"], 4.0),
        (["privacy.target_epsilon=8"], 8.0),
        # Poisson sampling at q = 1/2; this multiplier gives epsilon 4 after the 2 rounds (set,
        # not calibrated: calibrating the Poisson-sampled accountant takes minutes).
        (
            [
                "federation.sampling=poisson",
                "federation.fraction=0.5",
                "privacy.noise_multiplier=1.235",
            ],
            4.0,
        ),
    ],
)
def test_with_noise_the_bound_stays_below_the_accountants_epsilon(
    sets: list[str], epsilon: float
) -> None:
    report = privacy_audit(
        SMOKE, overrides=[*TINY, *sets, "threads=1"], canaries=1000, audit_seed=1
    )
    assert report.accountant_epsilon == pytest.approx(epsilon, rel=1e-2)
    assert 0 < report.epsilon_lower_bound < report.accountant_epsilon


@pytest.mark.parametrize(
    ("sets", "extra", "message"),
    [
        (["privacy.dp=off"], [], "privacy.dp is 'off'"),
        (["federation.fraction=0.5", "privacy.noise_multiplier=1"], [], "a cohort of fixed size"),
        (["privacy.noise_multiplier=1"], ["--canaries", "1"], "at least 2 canaries"),
        (["privacy.noise_multiplier=1"], ["--confidence", "1"], "confidence must be in"),
        pytest.param(  # known only once the model is built (the data read)
            ["privacy.noise_multiplier=1"],
            ["--canaries", "100000"],
            "between 2 and 2860",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_the_audit_refuses_what_it_cannot_attack_in_one_sentence(
    sets: list[str], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["privacy-audit", SMOKE, *_sets([*TINY, *sets]), *extra, "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert one_sentence(err.removeprefix("fedssd: error: "))


def test_the_audit_reads_a_run_folders_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(Path(SMOKE).read_text())
    # The smoke run has no DP: the audit names what is missing rather than failing elsewhere.
    assert main(["privacy-audit", str(run), "--quiet"]) == 2
    assert "privacy.dp is 'off'" in capsys.readouterr().err
