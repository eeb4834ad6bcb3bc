"""Client-level DP-FedAvg: clipping, the mechanism, secret noise, the ledger and its accountant,
target epsilon, what a DP run refuses and what it releases."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import secrets
import shutil
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedssd import api, config
from fedssd.cli import main
from fedssd.config import PrivacyConfig
from fedssd.errors import ConfigError
from fedssd.experiment import check_setup
from fedssd.federation.accounting import (
    RoundCharge,
    calibrate_noise,
    ledger,
    ledger_epsilon,
    round_charge,
    update_noise_multiplier,
)
from fedssd.federation.privacy import (
    NOISE,
    PrivateAggregator,
    SecretRandomness,
    clip_delta,
    flat_norm,
    private_mean,
    released,
)
from fedssd.federation.sampling import sample_clients
from fedssd.federation.server import Guards, Schedule, open_round
from fedssd.methods import ClientUpdate
from fedssd.runs.outputs import SERVER_ONLY_LOG, SERVER_ONLY_SUMMARY

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "src" / "fedssd" / "configs" / "smoke.toml")
TINY = [
    "data.train_subset=600",
    "data.test_subset=200",
    "model.width=4",
    "model.projector_hidden=32",
    "federation.rounds=2",
    "federation.batch_size=32",
    "evaluation.every=0",
    "evaluation.linear_epochs=0",
    "evaluation.metrics_samples=200",
    "evaluation.metrics_per_client=50",
]
DELTA = 1e-5


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=gen) * scale,
        "bn.running_var": torch.rand(8, generator=gen) + 0.5,
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.long),
    }


def _aggregator(
    cfg: PrivacyConfig, clients: int, *, fraction: float = 1.0, seed: int | None = None
) -> PrivateAggregator:
    return PrivateAggregator(
        cfg,
        num_clients=clients,
        fraction=fraction,
        sampling="fixed",
        rounds=1,
        randomness=SecretRandomness(seed),
    )


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _charge(k: int, m: int, z: float, sigma_b: float = 0.0) -> RoundCharge:
    return round_charge(
        num_clients=k,
        fraction=m / k,
        sampling="fixed",
        noise_multiplier=z,
        count_noise_multiplier=sigma_b,
    )


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("clip", [0.1, 1.0, 3.0, 1e3])
def test_clipping_bounds_every_update_norm(clip: float) -> None:
    global_state = _state(0)
    for seed in range(1, 6):
        client = _state(seed, scale=float(seed))
        delta, norm = clip_delta(global_state, client, clip)
        # Only the floating-point entries: the batch counter (it reveals the client's data
        # size) is never taken from a client.
        assert sorted(delta) == ["bn.running_var", "conv.weight"]
        raw = {k: client[k] - global_state[k] for k in delta}
        assert flat_norm(delta) <= clip * (1 + 1e-5)
        assert norm == pytest.approx(flat_norm(raw))
        if norm <= clip:  # within the bound: the change itself
            assert all(torch.equal(delta[k], raw[k]) for k in delta)
        else:  # scaled onto the sphere, same direction
            assert flat_norm(delta) == pytest.approx(clip, rel=1e-5)
            cosine = torch.nn.functional.cosine_similarity(
                delta["conv.weight"].flatten(), raw["conv.weight"].flatten(), dim=0
            )
            assert float(cosine) == pytest.approx(1.0, abs=1e-6)


def test_no_clipping_keeps_the_whole_change() -> None:
    global_state, client = _state(0), _state(1, scale=100.0)
    delta, _ = clip_delta(global_state, client, 0.0)
    assert torch.equal(delta["conv.weight"], client["conv.weight"] - global_state["conv.weight"])


# ----------------------------------------------------------------------------- the mechanism


def test_the_mean_divides_by_the_cohort_not_by_the_replies() -> None:
    """One client of a cohort of 4 replies: its clipped update counts a quarter (a mean over the
    replies would give it all, and the noise would grow 4 times: the scale would reveal how many
    answered)."""
    global_state = {"w": torch.zeros(10)}
    moved = {"w": torch.full((10,), 0.1)}
    cfg = PrivacyConfig(dp="fixed", clip_norm=100.0, noise_multiplier=0.0)
    aggregator = _aggregator(cfg, 4)
    new_state, record = aggregator.aggregate(
        global_state, [ClientUpdate(2, moved, 1.0)], keys=["w"], round_index=0
    )
    torch.testing.assert_close(new_state["w"], torch.full((10,), 0.025))
    assert record["dp_cohort"] == 4
    # No replies at all: the round still releases (noise only), it is not skipped.
    noisy = _aggregator(dataclasses.replace(cfg, noise_multiplier=1.0, clip_norm=1.0), 4)
    empty, record = noisy.aggregate(global_state, [], keys=["w"], round_index=0)
    assert not torch.equal(empty["w"], global_state["w"])
    assert record["dp_noise_std"] == pytest.approx(1.0 * 1.0 / 4)


def test_noise_empirical_std_matches_z_times_c_over_the_cohort() -> None:
    z, clip, clients = 1.3, 2.0, 4
    cfg = PrivacyConfig(dp="fixed", clip_norm=clip, noise_multiplier=z)
    global_state = {"w": torch.zeros(40_000), "b": torch.zeros(10_000)}
    # Every client sends the global model back: the new global model is pure noise.
    updates = [ClientUpdate(k, dict(global_state), 1.0) for k in range(clients)]
    aggregator = _aggregator(cfg, clients)
    new_state, record = aggregator.aggregate(global_state, updates, keys=["w", "b"], round_index=0)
    noise = torch.cat([new_state["w"], new_state["b"]]).double()
    expected = z * clip / clients  # std on the sum, z C, divided by the cohort
    assert record["dp_noise_std"] == pytest.approx(expected)
    n = noise.numel()
    # The sample std of n normals has standard error std / sqrt(2 n); allow 4 of them.
    assert abs(float(noise.std()) - expected) < 4 * expected / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(n)
    # A second run (a fresh secret) draws other noise.
    again, _ = _aggregator(cfg, clients).aggregate(
        global_state, updates, keys=["w", "b"], round_index=0
    )
    assert not torch.equal(again["w"], new_state["w"])


def test_batch_weights_are_capped_so_the_noise_does_not_grow_with_a_client() -> None:
    cfg = PrivacyConfig(
        dp="fixed", clip_norm=1.0, noise_multiplier=1.0, weighting="batches", weight_cap=10.0
    )
    from fedssd.federation.server import client_weight

    assert [client_weight(n, cfg) for n in (0, 5, 10, 1000)] == [0.0, 0.5, 1.0, 1.0]
    assert client_weight(1000, None) == 1000.0  # FedAvg's weight without DP
    record = _aggregator(cfg, 4).aggregate(
        {"w": torch.zeros(3)},
        [ClientUpdate(0, {"w": torch.ones(3)}, 1.0)],
        keys=["w"],
        round_index=0,
    )[1]
    assert record["dp_noise_std"] == pytest.approx(1.0 / 4)


def test_noise_keeps_running_variances_non_negative() -> None:
    cfg = PrivacyConfig(dp="fixed", clip_norm=1.0, noise_multiplier=50.0)
    global_state = {"bn.running_var": torch.ones(1000)}
    updates = [ClientUpdate(k, dict(global_state), 1.0) for k in range(2)]
    new_state, _ = _aggregator(cfg, 2).aggregate(
        global_state, updates, keys=["bn.running_var"], round_index=0
    )
    assert float(new_state["bn.running_var"].min()) >= 0.0


def test_without_noise_or_clipping_the_mechanism_is_the_uniform_mean() -> None:
    global_state = _state(0)
    clients = [_state(k, scale=float(k)) for k in range(1, 4)]
    new_state, within = private_mean(
        global_state,
        [ClientUpdate(k, s, 1.0) for k, s in enumerate(clients)],
        keys=list(global_state),
        clip_norm=0.0,
        noise_std=0.0,
        denominator=3,
        rng=None,
    )
    assert within == 3
    for key in ("conv.weight", "bn.running_var"):
        mean = torch.stack([s[key] for s in clients]).mean(0)
        torch.testing.assert_close(new_state[key], mean, rtol=1e-6, atol=1e-6)
    assert torch.equal(new_state["bn.num_batches_tracked"], global_state["bn.num_batches_tracked"])


# ----------------------------------------------------------------------------- secret randomness


def test_the_generator_is_secret_fresh_and_never_pickled(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []

    def randbits(k: int) -> int:
        drawn.append(k)
        return secrets.SystemRandom().getrandbits(k)

    monkeypatch.setattr(secrets, "randbits", randbits)
    first, second = SecretRandomness(), SecretRandomness()
    assert drawn == [256, 256]  # each from the OS entropy source, at least 128 bits
    a = first.generator(0, NOISE).standard_normal(8)
    b = second.generator(0, NOISE).standard_normal(8)
    assert not np.array_equal(a, b)
    # The secret stream is the Philox generator, whatever the round or the run seed.
    assert isinstance(first.generator(5, NOISE).bit_generator, np.random.Philox)
    assert not first.reproducible and "secret" in repr(first)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(first)
    # The test-only reproducible streams come from the run seed, per round and purpose.
    seeded = SecretRandomness(17)
    assert seeded.reproducible
    x = seeded.generator(3, NOISE).standard_normal(4)
    assert np.array_equal(x, SecretRandomness(17).generator(3, NOISE).standard_normal(4))
    assert not np.array_equal(x, SecretRandomness(17).generator(4, NOISE).standard_normal(4))


def test_a_dp_cohort_comes_from_the_secret_not_the_run_seed() -> None:
    model = torch.nn.Linear(2, 2)
    from fedssd.methods import build_method
    from helpers import method_context

    method = build_method("fedalignuniform", {}, method_context(num_clients=50))
    schedule = Schedule(
        num_clients=50, fraction=0.2, rounds=5, lr=0.1, lr_schedule="constant", seed=3
    )
    cfg = PrivacyConfig(dp="fixed", clip_norm=1.0, noise_multiplier=1.0)
    guards = Guards(privacy=_aggregator(cfg, 50, fraction=0.2))
    seeded = [sample_clients(num_clients=50, fraction=0.2, round_index=r, seed=3) for r in range(5)]
    private = [
        open_round(r, global_model=model, method=method, schedule=schedule, guards=guards).clients
        for r in range(5)
    ]
    assert all(len(c) == 10 for c in private)
    assert private != seeded


def test_poisson_sampling_takes_each_client_with_probability_q() -> None:
    cohorts = [
        sample_clients(num_clients=200, fraction=0.1, round_index=r, seed=1, sampling="poisson")
        for r in range(200)
    ]
    sizes = [len(c) for c in cohorts]
    assert len(set(sizes)) > 5  # the size varies
    # Mean 20, standard error sqrt(200 * 0.1 * 0.9 / 200) = 0.3 over 200 rounds.
    assert abs(np.mean(sizes) - 20) < 1.5
    counts = np.bincount([k for c in cohorts for k in c], minlength=200)
    assert counts.min() > 3 and counts.max() < 45
    assert cohorts[0] == sample_clients(
        num_clients=200, fraction=0.1, round_index=0, seed=1, sampling="poisson"
    )
    assert sample_clients(
        num_clients=5, fraction=1.0, round_index=0, seed=1, sampling="poisson"
    ) == list(range(5))


# ----------------------------------------------------------------------------- accountant


def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """The exact epsilon of a Gaussian mechanism of sensitivity 1 and std ``sigma`` (Balle &
    Wang, ICML 2018, Theorem 8), by bisection on its delta(epsilon)."""

    def phi(x: float) -> float:
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    def delta_of(eps: float) -> float:
        return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(
            -1 / (2 * sigma) - eps * sigma
        )

    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_of(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (2.0, 10), (5.0, 50)])
def test_cross_silo_epsilon_matches_the_library_and_the_closed_forms(z: float, rounds: int) -> None:
    charge = _charge(10, 10, z)
    assert charge.sampling == "all"
    eps = ledger_epsilon([charge] * rounds, DELTA)
    # The library's own value for the same setting.
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert eps == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    # T Gaussians of multiplier z are one of multiplier z / sqrt(T): RDP's epsilon lies between
    # that mechanism's exact epsilon and Mironov's (2017) closed-form bound
    # min_a T a / (2 z^2) + log(1 / delta) / (a - 1).
    exact = _analytic_gaussian_epsilon(z / math.sqrt(rounds), DELTA)
    mironov = min(
        rounds * a / (2 * z**2) + math.log(1 / DELTA) / (a - 1)
        for a in [1 + x / 100 for x in range(1, 100_000)]
    )
    assert exact <= eps <= mironov * (1 + 1e-9)
    assert eps < 1.5 * exact  # and RDP is close to exact for a pure Gaussian


@pytest.mark.slow
def test_fixed_size_sampling_is_accounted_without_replacement_under_replace_one() -> None:
    charge = _charge(100, 10, 1.0)
    assert (charge.sampling, charge.rate) == ("fixed", 0.1)
    reference = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.privacy_accountant.NeighboringRelation.REPLACE_ONE
    )
    # Replace-one adjacency: the clipped sum moves by up to 2 C, so the multiplier is z / 2.
    reference.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.5)),
        20,
    )
    eps = ledger_epsilon([charge] * 20, DELTA)
    assert eps == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    # Sampling amplifies privacy: less than every client in every round at the same z / 2.
    assert eps < ledger_epsilon([_charge(10, 10, 0.5)] * 20, DELTA)


@pytest.mark.slow
def test_poisson_sampling_is_accounted_as_the_poisson_sampled_gaussian() -> None:
    charge = round_charge(num_clients=1000, fraction=0.05, sampling="poisson", noise_multiplier=1.0)
    assert (charge.sampling, charge.cohort, charge.rate) == ("poisson", 50.0, 0.05)
    reference = dp_accounting.rdp.RdpAccountant()  # add/remove-one adjacency
    reference.compose(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 100
    )
    eps = ledger_epsilon([charge] * 100, DELTA)
    assert eps == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    # The add/remove Poisson convention needs less noise than replace-one fixed-size sampling.
    fixed = _charge(1000, 50, 1.0)
    assert eps < ledger_epsilon([fixed] * 100, DELTA)
    with pytest.raises(ConfigError, match="do not compose"):
        ledger_epsilon([charge, fixed], DELTA)


def test_the_ledger_composes_every_round_as_it_ran() -> None:
    rounds = [_charge(10, 10, 0.9)] * 2 + [_charge(10, 10, 1.5)] * 4
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(0.9), 2)
    reference.compose(dp_accounting.GaussianDpEvent(1.5), 4)
    assert ledger_epsilon(rounds, DELTA) == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    records = [{"round": i + 1, **c.to_record()} for i, c in enumerate(rounds)]
    assert ledger([*records, {"round": 7}]) == rounds
    assert ledger_epsilon([], DELTA) == 0.0
    assert ledger_epsilon([_charge(10, 10, 0.0)], DELTA) == math.inf


def test_records_without_a_ledger_cannot_be_continued() -> None:
    """A DP run recorded before the ledger (epsilon but no charge) would be under-counted."""
    cfg = PrivacyConfig(dp="fixed", clip_norm=1.0, noise_multiplier=1.0)
    old = [{"round": 1, "dp_epsilon": 3.0, "dp_noise_multiplier": 1.0, "dp_delta": DELTA}]
    with pytest.raises(ConfigError, match="before the privacy ledger"):
        PrivateAggregator(
            cfg,
            num_clients=4,
            fraction=1.0,
            sampling="fixed",
            rounds=2,
            randomness=SecretRandomness(),
            history=old,
        )


def test_adaptive_clipping_splits_the_budget_without_spending_more() -> None:
    z, sigma_b = 1.5, 2.0
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    with_count = ledger_epsilon([_charge(10, 10, z, sigma_b)] * 8, DELTA)
    alone = ledger_epsilon([_charge(10, 10, z)] * 8, DELTA)
    assert with_count == pytest.approx(alone, rel=1e-6)
    with pytest.raises(ConfigError, match="count_noise_multiplier"):
        update_noise_multiplier(z, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize(("sampled", "target"), [(10, 1.0), (10, 8.0), (5, 4.0)])
def test_calibrated_noise_meets_the_target_and_no_less_would(sampled: int, target: float) -> None:
    charge = _charge(10, sampled, 0.0)
    z = calibrate_noise([], charge, 8, target, DELTA)
    assert ledger_epsilon([charge.with_noise(z)] * 8, DELTA) <= target
    assert ledger_epsilon([charge.with_noise(z * 0.99)] * 8, DELTA) > target
    if charge.sampling == "fixed":
        return  # below: the every-client case (fixed-size sampling is slow to account)
    # With rounds already spent, only the new ones are calibrated, against what is left.
    spent = [charge.with_noise(z)] * 4
    more = calibrate_noise(spent, charge, 4, target, DELTA)
    assert more == pytest.approx(z, rel=2e-3)
    with pytest.raises(ConfigError, match="cannot be continued"):
        calibrate_noise([charge.with_noise(z)] * 9, charge, 1, target, DELTA)


def test_a_calibration_or_an_epsilon_asked_again_is_not_recomputed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run asks the accountant the same questions several times (the setup check and each
    aggregator calibrate; the budget check, the round's record and the summary take the same
    epsilon): each is computed once, and the answer is the same."""
    calls: list[str] = []
    calibrate, compose = dp_accounting.calibrate_dp_mechanism, dp_accounting.rdp.RdpAccountant

    def counted_calibrate(*args: object, **kwargs: object) -> float:
        calls.append("calibrate")
        return calibrate(*args, **kwargs)  # type: ignore[arg-type]

    def counted_accountant(*args: object, **kwargs: object) -> object:
        calls.append("accountant")
        return compose(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(dp_accounting, "calibrate_dp_mechanism", counted_calibrate)
    charge = _charge(10, 10, 0.0)
    target = 3.217  # a question no other test asks
    first = calibrate_noise([], charge, 7, target, DELTA)
    assert calls == ["calibrate"]
    assert calibrate_noise((), charge, 7, target, DELTA) == first
    assert calls == ["calibrate"]
    monkeypatch.setattr(dp_accounting.rdp, "RdpAccountant", counted_accountant)
    spent = [charge.with_noise(first)] * 7
    eps = ledger_epsilon(spent, DELTA)
    assert calls == ["calibrate", "accountant"]
    assert ledger_epsilon(tuple(spent), DELTA) == eps <= target
    assert calls == ["calibrate", "accountant"]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["method.name=ldawa"], "aggregates with its own rule"),
        (["method.name=fedu2"], "aggregates with its own rule"),
        (["method.name=orchestra"], "aggregates with its own rule"),
        (["privacy.noise_multiplier=1", "privacy.clip_norm=0"], "only allowed with"),
        (["privacy.delta=0"], "privacy.delta"),
        (["validation.max_norm_ratio=10"], "sensitivity bound"),
        (["privacy.weighting=batches"], "public cap"),
        (["faults.min_clients=2"], "faults.min_clients"),
    ],
)
def test_dp_refuses_methods_and_settings_in_one_sentence(sets: list[str], message: str) -> None:
    from helpers import one_sentence

    base = [*TINY, "privacy.dp=fixed", "privacy.target_epsilon=4"]
    with pytest.raises(ConfigError, match=message) as error:
        cfg = config.load(SMOKE, [*base, *sets])
        check_setup(cfg)
    assert one_sentence(str(error.value))


def test_dp_needs_a_noise_multiplier_or_a_target_and_turns_the_norm_check_off() -> None:
    with pytest.raises(ConfigError, match=r"noise_multiplier or privacy\.target_epsilon"):
        config.load(SMOKE, ["privacy.dp=fixed"])
    plain = config.load(SMOKE)
    assert plain.privacy.dp == "off" and plain.validation.max_norm_ratio == 10  # off by default
    private = config.load(SMOKE, ["privacy.dp=fixed", "privacy.target_epsilon=8"])
    assert private.validation.max_norm_ratio == 0


@pytest.mark.slow
def test_the_shipped_privacy_grid_is_accepted() -> None:
    from fedssd import presets
    from fedssd.experiments.grid import load_grid
    from fedssd.experiments.plan import plan

    grid = load_grid(presets.grid_path("fmnist-privacy"))
    runs = plan(grid, ROOT / "runs" / "never-written")
    private = [run for run in runs if run.config.privacy.dp != "off"]
    assert len(private) == 18
    for run in private:
        assert run.config.validation.max_norm_ratio == 0
        check_setup(run.config)


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_dp_without_noise_or_clipping_is_fedavg_of_equal_clients() -> None:
    """Equal clients (an iid split into equal parts, so FedAvg's batch weights are equal) that
    all reply: the noiseless, unclipped DP mean is FedAvg's, to float rounding (one round: later
    rounds of training would amplify the rounding)."""
    sets = [*TINY, "data.partition=iid", "federation.rounds=1"]
    plain = api.train(SMOKE, overrides=sets, log=None)
    dp = api.train(
        SMOKE,
        overrides=[*sets, "privacy.dp=fixed", "privacy.noise_multiplier=0", "privacy.clip_norm=0"],
        log=None,
    )
    first, second = plain.model.state_dict(), dp.model.state_dict()
    assert first.keys() == second.keys()
    for key, value in first.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, second[key], rtol=1e-5, atol=1e-6, msg=key)
    # Without noise there is no privacy, and the record says so.
    assert dp.history[-1]["dp_epsilon"] == math.inf
    assert dp.summary["dp_epsilon"] == math.inf


@pytest.mark.slow
def test_a_dp_run_releases_only_what_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = secrets.randbits(256) | (1 << 255)
    monkeypatch.setattr(secrets, "randbits", lambda _bits: secret)
    sets = [*TINY, "checkpoint.every=1", "privacy.dp=adaptive"]
    sets += ["privacy.noise_multiplier=1.0", "privacy.count_noise_multiplier=5.0"]
    sets += ["tracking.backends=tensorboard"]
    run = tmp_path / "run"
    args = ["train", "--config", SMOKE, "--out", str(run), "--threads", "1"]
    assert main([*args, *[a for item in sets for a in ("--set", item)]]) == 0
    assert "NOT private" not in capsys.readouterr().err
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for record in lines:
        assert set(record) <= {"round", "lr"} | {k for k in record if k.startswith("dp_")}
        assert "dp_unclipped_fraction" not in record
        # The ledger of the round: how the cohort was drawn and the noise it had.
        assert record["dp_sampling"] == "all" and record["dp_noise_multiplier"] == 1.0
        assert record["dp_count_noise_multiplier"] == 5.0 and record["dp_cohort"] == 4
    # The per-client values are in the server-only log.
    kept = [json.loads(line) for line in (run / SERVER_ONLY_LOG).read_text().splitlines()]
    assert [r["round"] for r in kept] == [1, 2]
    for record in kept:
        assert {"clients", "samples", "loss", "failed", "dp_unclipped_fraction"} <= set(record)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dp_private"] is True
    assert summary["dp_epsilon"] == pytest.approx(lines[-1]["dp_epsilon"])
    assert not {"failed_clients", "uniformity_intra", "uniformity_inter"} & set(summary)
    assert "uniformity_intra" in json.loads((run / SERVER_ONLY_SUMMARY).read_text())
    # The trackers received only the released scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "round/dp_epsilon" in tags
    rounds = {tag for tag in tags if tag.startswith("round/")}
    assert {tag for tag in rounds if not tag.startswith("round/dp_")} <= {"round/lr"}, rounds
    assert "round/dp_unclipped_fraction" not in tags and "summary/failed_clients" not in tags
    # The checkpoint holds the ledger (its history is the server's, with everything).
    state = json.loads(
        (run / "checkpoints" / "round-000002" / "state.json").read_text(encoding="utf-8")
    )
    assert ledger(state["history"]) == ledger(lines)
    # The secret is nowhere in the run folder (config.toml is what every Flower client receives).
    needles = [str(secret).encode(), f"{secret:x}".encode(), secret.to_bytes(32, "little")]
    needles += [secret.to_bytes(32, "big")]
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(needle in data for needle in needles), path


@pytest.mark.slow
def test_a_poisson_sampled_dp_run_is_accounted_as_such(tmp_path: Path) -> None:
    sets = [*TINY, "federation.sampling=poisson", "federation.fraction=0.5"]
    sets += ["privacy.dp=fixed", "privacy.noise_multiplier=1.0"]
    run = tmp_path / "run"
    result = api.train(SMOKE, overrides=sets, out=run, log=None)
    records = _records(run / "metrics.jsonl")
    expected = round_charge(num_clients=4, fraction=0.5, sampling="poisson", noise_multiplier=1.0)
    assert ledger(records) == [expected] * 2
    assert records[0]["dp_cohort"] == 2.0 and records[0]["dp_noise_std"] == pytest.approx(0.5)
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.0)), 2
    )
    assert result.summary["dp_epsilon"] == pytest.approx(reference.get_epsilon(DELTA), rel=1e-9)
    # The cohorts, drawn from the secret, are known to the server alone.
    cohorts = [r["clients"] for r in _records(run / SERVER_ONLY_LOG)]
    assert len(cohorts) == 2 and all(set(c) <= {0, 1, 2, 3} for c in cohorts)


@pytest.mark.slow
def test_dp_run_reports_epsilon_every_round_and_stops_at_the_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = [*TINY, "federation.rounds=3", "checkpoint.every=1", "privacy.dp=adaptive"]
    sets += ["privacy.noise_multiplier=1.0", "privacy.count_noise_multiplier=5.0"]
    charge = _charge(4, 4, 1.0, 5.0)
    # A budget that round 2 spends but round 3 would exceed.
    target = (ledger_epsilon([charge] * 2, DELTA) + ledger_epsilon([charge] * 3, DELTA)) / 2
    args = ["train", "--config", SMOKE, "--out", str(tmp_path / "run")]
    args += [a for item in [*sets, f"privacy.target_epsilon={target}"] for a in ("--set", item)]
    assert main(args) == 2
    assert "privacy.target_epsilon" in capsys.readouterr().err
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for done, record in enumerate(records, start=1):
        assert record["dp_epsilon"] == pytest.approx(ledger_epsilon([charge] * done, DELTA))
        assert record["dp_delta"] == DELTA
    # Adaptive clipping moved the clip norm, and the next round starts from it.
    assert records[0]["dp_next_clip_norm"] != records[0]["dp_clip_norm"]
    assert records[1]["dp_clip_norm"] == records[0]["dp_next_clip_norm"]
    assert (run / "checkpoints" / "round-000002").is_dir()
    assert not (run / "summary.json").exists()
    # Without a budget the same run finishes and summary.json has the final (epsilon, delta).
    done = api.train(SMOKE, overrides=sets, out=tmp_path / "full", log=None)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["dp_epsilon"] == pytest.approx(ledger_epsilon([charge] * 3, DELTA))
    assert summary["dp_delta"] == DELTA
    assert load_file(str(tmp_path / "full" / "model.safetensors")).keys() == (
        done.model.state_dict().keys()
    )


@pytest.mark.slow
def test_extending_a_calibrated_run_spends_only_the_budget_left(tmp_path: Path) -> None:
    """Target 8: 2 rounds, then extended to 4. The rounds added are calibrated against what the
    first 2 left, and the reported epsilon is the epsilon of the multipliers actually used."""
    sets = [*TINY, "checkpoint.every=1", "privacy.dp=fixed", "privacy.target_epsilon=8"]
    run = tmp_path / "run"
    api.train(SMOKE, overrides=sets, out=run, log=None)
    extended = api.resume(run, rounds=4, log=None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    used = [r["dp_noise_multiplier"] for r in records]
    assert len(used) == 4 and used[0] == used[1] and used[2] == used[3] and used[2] > used[1]
    # What the noise actually used costs, accounted here from the multipliers alone.
    reference = dp_accounting.rdp.RdpAccountant()
    for z in used:
        reference.compose(dp_accounting.GaussianDpEvent(z))
    true_epsilon = reference.get_epsilon(DELTA)
    assert extended.summary["dp_epsilon"] == pytest.approx(true_epsilon, rel=1e-9)
    assert records[-1]["dp_epsilon"] == pytest.approx(true_epsilon, rel=1e-9)
    assert true_epsilon <= 8.0
    # The 2-round run's summary was kept aside, with what it had spent.
    first = json.loads((run / "rounds-2" / "summary.json").read_text())
    assert first["dp_epsilon"] == pytest.approx(records[1]["dp_epsilon"])
    assert (run / "rounds-2" / SERVER_ONLY_SUMMARY).is_file()


@pytest.mark.slow
def test_an_extension_the_budget_cannot_pay_is_refused_before_anything_moves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    charge = _charge(4, 4, 1.0)
    target = (ledger_epsilon([charge] * 2, DELTA) + ledger_epsilon([charge] * 3, DELTA)) / 2
    sets = [*TINY, "checkpoint.every=1", "privacy.dp=fixed", "privacy.noise_multiplier=1.0"]
    run = tmp_path / "run"
    api.train(SMOKE, overrides=[*sets, f"privacy.target_epsilon={target}"], out=run, log=None)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(run), "--rounds", "4"]) == 2
    assert "privacy.target_epsilon" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not (run / "rounds-2").exists()


@pytest.mark.slow
def test_reproducible_noise_says_the_run_is_not_private_and_resumes_bit_for_bit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = [*TINY, "checkpoint.every=1", "checkpoint.keep=2"]
    sets += ["privacy.dp=adaptive", "privacy.noise_multiplier=0.5"]
    sets += ["privacy.count_noise_multiplier=5.0", "privacy.clip_norm=2.0"]
    sets += ["privacy.reproducible_noise=true"]
    run = tmp_path / "run"
    args = ["train", "--config", SMOKE, "--out", str(run), "--threads", "1"]
    assert main([*args, *[a for item in sets for a in ("--set", item)]]) == 0
    assert "NOT private" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["dp_private"] is False
    whole = load_file(str(run / "model.safetensors"))
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # As if it had been killed after round 1: the newest checkpoint is round 1's.
    shutil.rmtree(run / "checkpoints" / "round-000002")
    (run / "summary.json").unlink()
    resumed = api.resume(run, threads=1, log=None)
    for key, value in whole.items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    # The clip norm of round 2 came back from round 1's record, not from privacy.clip_norm.
    assert resumed.history[1]["dp_clip_norm"] == history[0]["dp_next_clip_norm"] != 2.0


@pytest.mark.slow
def test_a_resumed_dp_run_draws_fresh_secret_noise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = [*TINY, "federation.rounds=2", "checkpoint.every=1"]
    sets += ["privacy.dp=fixed", "privacy.noise_multiplier=1.0"]
    run = tmp_path / "run"
    whole = api.train(SMOKE, overrides=sets, out=run, log=None)
    shutil.rmtree(run / "checkpoints" / "round-000002")
    (run / "summary.json").unlink()
    drawn: list[int] = []
    monkeypatch.setattr(secrets, "randbits", lambda bits: drawn.append(bits) or 12345 + len(drawn))
    resumed = api.resume(run, log=None)
    assert drawn  # a new secret was drawn for the resumed process
    weight = "encoder.features.0.weight"
    assert not torch.equal(whole.model.state_dict()[weight], resumed.model.state_dict()[weight])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["dp_noise_multiplier"] for r in records] == [1.0, 1.0]
    assert records[-1]["dp_epsilon"] == pytest.approx(
        ledger_epsilon([_charge(4, 4, 1.0)] * 2, DELTA)
    )


def test_released_keeps_the_ledger_and_drops_per_client_values() -> None:
    record = {
        "round": 3,
        "lr": 0.1,
        "clients": [0, 2],
        "samples": {"0": 5},
        "loss": 1.0,
        "loss_align": 0.5,
        "accepted": 2,
        "failed": {},
        "skipped": False,
        "seconds": 1.0,
        "client_state": {"0": {"mu": 1.0}},
        "knn_acc": 0.5,
        "dp_unclipped_fraction": 0.5,
        **_charge(10, 2, 1.0).to_record(),
        "dp_epsilon": 1.0,
    }
    kept = released(record)
    assert set(kept) == {"round", "lr", "knn_acc", "dp_epsilon"} | set(
        _charge(10, 2, 1.0).to_record()
    )
    assert RoundCharge.from_record(kept) == _charge(10, 2, 1.0)
