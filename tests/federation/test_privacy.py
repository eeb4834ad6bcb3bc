"""Issue 14: client-level DP-FedAvg (clipping, noise, accountant, target epsilon)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import dp_accounting
import pytest
import torch
from safetensors.torch import load_file

from fedssd import api, config
from fedssd.cli import main
from fedssd.config import PrivacyConfig
from fedssd.errors import ConfigError
from fedssd.experiment import check_setup
from fedssd.federation.privacy import (
    Accounting,
    PrivateAggregator,
    calibrate_noise,
    clip_update,
    epsilon_after,
    flat_norm,
    gaussian_noise,
    update_noise_multiplier,
)
from fedssd.methods import ClientUpdate

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
    "evaluation.linear_epochs=2",
    "evaluation.metrics_samples=200",
    "evaluation.metrics_per_client=50",
]


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=gen) * scale,
        "bn.running_var": torch.rand(8, generator=gen) + 0.5,
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.long),
    }


# ----------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("clip", [0.1, 1.0, 3.0, 1e3])
def test_clipping_bounds_every_update_norm(clip: float) -> None:
    global_state = _state(0)
    for seed in range(1, 6):
        client = _state(seed, scale=float(seed))
        clipped, norm = clip_update(global_state, client, clip)
        floats = [k for k, v in client.items() if v.is_floating_point()]
        delta = {k: clipped[k] - global_state[k] for k in floats}
        assert flat_norm(delta) <= clip * (1 + 1e-5)
        assert norm == pytest.approx(flat_norm({k: client[k] - global_state[k] for k in floats}))
        if norm <= clip:  # within the bound: the client's own tensors, untouched
            assert all(clipped[k] is client[k] for k in floats)
        else:  # clipped onto the sphere, same direction
            assert flat_norm(delta) == pytest.approx(clip, rel=1e-5)
        # The batch counter (it reveals the client's data size) is the global one.
        assert torch.equal(
            clipped["bn.num_batches_tracked"], global_state["bn.num_batches_tracked"]
        )


def test_no_clipping_is_the_identity_on_floats() -> None:
    global_state, client = _state(0), _state(1, scale=100.0)
    clipped, _ = clip_update(global_state, client, 0.0)
    assert clipped["conv.weight"] is client["conv.weight"]


# ----------------------------------------------------------------------------- noise


def test_noise_empirical_std_matches_z_times_c() -> None:
    z, clip, clients = 1.3, 2.0, 4
    cfg = PrivacyConfig(dp="fixed", clip_norm=clip, noise_multiplier=z)
    aggregator = PrivateAggregator(cfg, num_clients=clients, sampled=clients, rounds=1, seed=3)
    global_state = {"w": torch.zeros(40_000), "b": torch.zeros(10_000)}
    # Every client sends the global model back: the new global model is pure noise.
    updates = [ClientUpdate(k, dict(global_state), 7.0) for k in range(clients)]
    new_state, record = aggregator.aggregate(global_state, updates, round_index=0)
    noise = torch.cat([new_state["w"], new_state["b"]]).double()
    expected = z * clip / clients  # std on the sum, z C, divided by the number of clients
    assert record["dp_noise_std"] == pytest.approx(expected)
    n = noise.numel()
    # The sample std of n normals has standard error std / sqrt(2 n); allow 4 of them.
    assert abs(float(noise.std()) - expected) < 4 * expected / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(n)
    # Reproducible from the run seed and the round; another round draws other noise.
    again = gaussian_noise(global_state, 1.0, seed=3, round_index=0)
    other = gaussian_noise(global_state, 1.0, seed=3, round_index=1)
    assert torch.equal(again["w"] * expected, new_state["w"])
    assert not torch.equal(again["w"], other["w"])


def test_noise_keeps_running_variances_non_negative() -> None:
    cfg = PrivacyConfig(dp="fixed", clip_norm=1.0, noise_multiplier=50.0)
    aggregator = PrivateAggregator(cfg, num_clients=2, sampled=2, rounds=1, seed=0)
    global_state = {"bn.running_var": torch.ones(1000)}
    updates = [ClientUpdate(k, dict(global_state), 1.0) for k in range(2)]
    new_state, _ = aggregator.aggregate(global_state, updates, round_index=0)
    assert float(new_state["bn.running_var"].min()) >= 0.0


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
    delta = 1e-5
    accounting = Accounting(10, 10, z, 0.0, delta)
    eps = epsilon_after(accounting, rounds)
    # The library's own value for the same setting.
    reference = dp_accounting.rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(z), rounds)
    assert eps == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    # T Gaussians of multiplier z are one of multiplier z / sqrt(T): RDP's epsilon lies between
    # that mechanism's exact epsilon and Mironov's (2017) closed-form bound
    # min_a T a / (2 z^2) + log(1 / delta) / (a - 1).
    exact = _analytic_gaussian_epsilon(z / math.sqrt(rounds), delta)
    mironov = min(
        rounds * a / (2 * z**2) + math.log(1 / delta) / (a - 1)
        for a in [1 + x / 100 for x in range(1, 100_000)]
    )
    assert exact <= eps <= mironov * (1 + 1e-9)
    assert eps < 1.5 * exact  # and RDP is close to exact for a pure Gaussian


def test_cross_device_epsilon_is_sampling_without_replacement() -> None:
    delta, z = 1e-5, 1.0
    accounting = Accounting(100, 10, z, 0.0, delta)
    reference = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.privacy_accountant.NeighboringRelation.REPLACE_ONE
    )
    # Replace-one adjacency: the clipped sum moves by up to 2 C, so the multiplier is z / 2.
    reference.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(
            100, 10, dp_accounting.GaussianDpEvent(z / 2)
        ),
        20,
    )
    eps = epsilon_after(accounting, 20)
    assert eps == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    # Sampling amplifies privacy: less than every client in every round at the same z / 2.
    assert eps < epsilon_after(Accounting(10, 10, z / 2, 0.0, delta), 20)


def test_adaptive_clipping_splits_the_budget_without_spending_more() -> None:
    z, sigma_b = 1.5, 2.0
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    with_count = epsilon_after(Accounting(10, 10, z, sigma_b, 1e-5), 8)
    alone = epsilon_after(Accounting(10, 10, z, 0.0, 1e-5), 8)
    assert with_count == pytest.approx(alone, rel=1e-6)
    with pytest.raises(ConfigError, match="count_noise_multiplier"):
        update_noise_multiplier(z, 0.5)


@pytest.mark.slow
@pytest.mark.parametrize(("sampled", "target"), [(10, 1.0), (10, 8.0), (5, 4.0)])
def test_calibrated_noise_meets_the_target_and_no_less_would(sampled: int, target: float) -> None:
    accounting = Accounting(10, sampled, 0.0, 0.0, 1e-5)
    z = calibrate_noise(accounting, 8, target)
    assert epsilon_after(accounting, 8, z) <= target
    assert epsilon_after(accounting, 8, z * 0.99) > target


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_dp_without_noise_or_clipping_reproduces_the_plain_run_bit_for_bit() -> None:
    plain = api.train(SMOKE, overrides=TINY, log=None)
    dp = api.train(
        SMOKE,
        overrides=[
            *TINY,
            "privacy.dp=fixed",
            "privacy.noise_multiplier=0",
            "privacy.clip_norm=0",
            "privacy.weighting=batches",
        ],
        log=None,
    )
    first, second = plain.model.state_dict(), dp.model.state_dict()
    assert first.keys() == second.keys()
    for key, value in first.items():
        if value.is_floating_point():
            assert torch.equal(value, second[key]), key
    # Without noise there is no privacy, and the record says so.
    assert dp.history[-1]["dp_epsilon"] == math.inf
    assert dp.summary["dp_epsilon"] == math.inf


@pytest.mark.slow
def test_dp_run_reports_epsilon_every_round_and_stops_at_the_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sets = [*TINY, "federation.rounds=4", "checkpoint.every=1", "privacy.dp=adaptive"]
    sets += ["privacy.noise_multiplier=1.0", "privacy.count_noise_multiplier=5.0"]
    accounting = Accounting(4, 4, 1.0, 5.0, 1e-5)
    # A budget that round 2 spends but round 3 would exceed.
    target = (epsilon_after(accounting, 2) + epsilon_after(accounting, 3)) / 2
    args = ["train", "--config", SMOKE, "--out", str(tmp_path / "run")]
    args += [a for item in [*sets, f"privacy.target_epsilon={target}"] for a in ("--set", item)]
    assert main(args) == 2
    assert "privacy.target_epsilon" in capsys.readouterr().err
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for done, record in enumerate(records, start=1):
        assert record["dp_epsilon"] == pytest.approx(epsilon_after(accounting, done))
        assert record["dp_delta"] == 1e-5
    # Adaptive clipping moved the clip norm, and the next round starts from it.
    assert records[0]["dp_next_clip_norm"] != records[0]["dp_clip_norm"]
    assert records[1]["dp_clip_norm"] == records[0]["dp_next_clip_norm"]
    assert (run / "checkpoints" / "round-000002").is_dir()
    assert not (run / "summary.json").exists()
    # Without a budget the same run finishes and summary.json has the final (epsilon, delta).
    done = api.train(SMOKE, overrides=sets, out=tmp_path / "full", log=None)
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["dp_epsilon"] == pytest.approx(epsilon_after(accounting, 4))
    assert summary["dp_delta"] == 1e-5
    assert load_file(str(tmp_path / "full" / "model.safetensors")).keys() == (
        done.model.state_dict().keys()
    )


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["method.name=ldawa"], "aggregates with its own rule"),
        (["method.name=fedu2"], "aggregates with its own rule"),
        (["method.name=orchestra"], "aggregates with its own rule"),
        (["privacy.noise_multiplier=1", "privacy.clip_norm=0"], "only allowed with"),
        (["privacy.delta=0"], "privacy.delta"),
    ],
)
def test_dp_refuses_methods_and_settings_in_one_sentence(sets: list[str], message: str) -> None:
    base = [*TINY, "privacy.dp=fixed", "privacy.target_epsilon=4"]
    with pytest.raises(ConfigError, match=message):
        cfg = config.load(SMOKE, [*base, *sets])
        check_setup(cfg)


def test_dp_needs_a_noise_multiplier_or_a_target() -> None:
    with pytest.raises(ConfigError, match=r"noise_multiplier or privacy\.target_epsilon"):
        config.load(SMOKE, ["privacy.dp=fixed"])
    assert config.load(SMOKE).privacy.dp == "off"  # off by default


@pytest.mark.slow
def test_adaptive_dp_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    sets = [*TINY, "federation.rounds=3", "checkpoint.every=1", "checkpoint.keep=2"]
    sets += ["privacy.dp=adaptive", "privacy.noise_multiplier=0.5"]
    sets += ["privacy.count_noise_multiplier=5.0", "privacy.clip_norm=2.0"]
    run = tmp_path / "run"
    whole = api.train(SMOKE, overrides=sets, out=run, log=None)
    # As if it had been killed after round 2: the newest checkpoint is round 2's.
    shutil.rmtree(run / "checkpoints" / "round-000003")
    (run / "summary.json").unlink()
    resumed = api.resume(run, log=None)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    # The clip norm of round 3 came back from round 2's record, not from privacy.clip_norm.
    assert resumed.history[2]["dp_clip_norm"] == whole.history[1]["dp_next_clip_norm"] != 2.0
