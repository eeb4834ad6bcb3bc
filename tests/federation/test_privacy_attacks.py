"""Attacks on a finished DP run by someone who holds only its released files.

The seed-regeneration attack: with the noise drawn from the run seed (which ``config.toml``
holds), anyone with ``model.safetensors``, ``config.toml`` and ``dp_noise_std`` could regenerate
the last round's noise and subtract it, leaving the noiseless clipped average; without the config,
a scan of small seeds against the released model alone finds the seed. The noise now comes from a
secret, so both fail; with ``privacy.reproducible_noise`` (tests only) the same attack succeeds,
which shows it has the power to succeed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedssd import api
from fedssd.runs.model import make_model
from fedssd.runs.resolve import load_config
from fedssd.seeding import derive_seed

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "src" / "fedssd" / "configs" / "smoke.toml")
# One round of 4 clients, every client every round (no cohort to guess): the released model is
# global + (sum of clipped updates + noise) / 4.
ONE_ROUND = [
    "data.train_subset=600",
    "data.test_subset=200",
    "model.width=4",
    "model.projector_hidden=32",
    "federation.rounds=1",
    "federation.batch_size=32",
    "evaluation.every=0",
    "evaluation.linear_epochs=0",
    "evaluation.metrics_samples=200",
    "evaluation.metrics_per_client=50",
    "privacy.dp=fixed",
    "privacy.clip_norm=1.0",
]
# How the noise used to be drawn: a torch generator seeded from (run seed, "DP", round).
OLD_NOISE_TAG = 0x4450

Regenerate = Callable[[int, dict[str, torch.Tensor], float], dict[str, torch.Tensor]]


def _train(out: Path, *sets: str) -> Path:
    api.train(SMOKE, overrides=[*ONE_ROUND, *sets], out=out, log=None)
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The noiseless run that both attacks compare with (the same seed and clipping)."""
    return _train(tmp_path_factory.mktemp("attacks") / "clean", "privacy.noise_multiplier=0")


def _floating_keys(run: Path) -> list[str]:
    """The model's floating-point entries in state-dict order (the attacker has the code)."""
    cfg = load_config(run / "config.toml")
    model = make_model(cfg, 1, torch.device("cpu"))
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def _seeded_noise(
    seed: int, template: dict[str, torch.Tensor], std: float
) -> dict[str, torch.Tensor]:
    """The noise of round 1 as drawn from the run seed."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, OLD_NOISE_TAG, 0))
    return {k: torch.randn(v.shape, generator=gen) * std for k, v in template.items()}


def _attack(run: Path, clean: Path, regenerate: Regenerate) -> tuple[float, float]:
    """Subtract the regenerated noise from the released model.

    Returns:
        The noise's standard deviation and the standard deviation of what is left minus the
        noiseless model of the run ``clean``, over the entries that were not clamped.
    """
    seed = load_config(run / "config.toml").seed
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    std = float(record["dp_noise_std"])
    released = load_file(str(run / "model.safetensors"))
    keys = _floating_keys(run)
    noise = regenerate(seed, {k: released[k] for k in keys}, std)
    noiseless = load_file(str(clean / "model.safetensors"))
    # Running variances were clamped at 0 after the noise: they are left out.
    kept = [k for k in keys if not k.endswith("running_var")]
    left = torch.cat([(released[k] - noise[k] - noiseless[k]).flatten() for k in kept])
    return std, float(left.double().std())


def _seed_scan(run: Path, seeds: range) -> tuple[list[float], int]:
    """The correlation of the released model with each seed's regenerated noise."""
    released = load_file(str(run / "model.safetensors"))
    keys = _floating_keys(run)
    flat = torch.cat([released[k].flatten() for k in keys]).double()
    template = {k: released[k] for k in keys}
    correlations = []
    for seed in seeds:
        noise = _seeded_noise(seed, template, 1.0)
        guess = torch.cat([noise[k].flatten() for k in keys]).double()
        correlations.append(float(torch.corrcoef(torch.stack([flat, guess]))[0, 1]))
    return correlations, flat.numel()


@pytest.mark.slow
def test_the_released_files_do_not_give_the_noise_away(tmp_path: Path, clean: Path) -> None:
    run = _train(tmp_path / "noisy", "privacy.noise_multiplier=1.0")
    std, left = _attack(run, clean, _seeded_noise)
    # The noise drawn from the run seed was subtracted to within float rounding (about 1e-7);
    # secret noise leaves the secret noise and the guess: sqrt(2) * std.
    assert left > 0.5 * std, (std, left)
    correlations, n = _seed_scan(run, range(200))
    # The run seed (17) correlated 0.76 with the released model; now no seed stands out from
    # the chance correlations of n independent pairs (standard deviation 1 / sqrt(n)).
    assert max(abs(c) for c in correlations) < 6 / math.sqrt(n), max(correlations)


@pytest.mark.slow
def test_the_attack_succeeds_where_the_noise_is_reproducible(tmp_path: Path, clean: Path) -> None:
    from fedssd.federation.privacy import NOISE, SecretRandomness, gaussian_noise

    def regenerate(
        seed: int, template: dict[str, torch.Tensor], std: float
    ) -> dict[str, torch.Tensor]:
        return gaussian_noise(template, std, SecretRandomness(seed).generator(0, NOISE))

    run = _train(
        tmp_path / "noisy", "privacy.noise_multiplier=1.0", "privacy.reproducible_noise=true"
    )
    std, left = _attack(run, clean, regenerate)
    assert left < 1e-5 * std, (std, left)
    assert json.loads((run / "summary.json").read_text())["dp_private"] is False
