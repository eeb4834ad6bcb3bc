"""Distributed DP (``privacy.mode = "distributed"``): each client clips its update and adds its own
share of the Gaussian noise before SecAgg+, so the server sees only the noised sum.

Unit tests of the client's share (its deviation, its secrecy), the ledger of a round with dropped
clients, the server's view (no amplification), the refusals, and the regeneration attack: with
the run's config and seed the server cannot regenerate the clients' noise. The Flower SecAgg+ run
itself is tests/flower/test_distributed_dp_simulation.py.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import pytest
import torch
from test_privacy import SMOKE, TINY

from fedssd import config
from fedssd.config import PrivacyConfig
from fedssd.errors import ConfigError
from fedssd.experiment import build_experiment, check_setup
from fedssd.federation.accounting import ledger, ledger_epsilon, round_charge
from fedssd.federation.privacy import (
    SHARE,
    PrivateAggregator,
    SecretRandomness,
    SecureSum,
    flat_norm,
    min_noise_shares,
    noised_share,
    privacy_summary,
    server_epsilon,
    share_generator,
)

pytest.importorskip("flwr")
from fedssd.flower import secagg

DELTA = 1e-5
DISTRIBUTED = ["privacy.dp=fixed", "privacy.mode=distributed", "privacy.noise_multiplier=1"]


def _distributed(
    clients: int, *, z: float | None = 1.0, target: float = 0.0, rounds: int = 1, **kw: float
) -> PrivateAggregator:
    cfg = PrivacyConfig(
        dp="fixed",
        mode="distributed",
        clip_norm=kw.get("clip", 1.0),
        noise_multiplier=z,
        target_epsilon=target,
        delta=DELTA,
        min_replies=kw.get("min_replies", 0.5),
    )
    return PrivateAggregator(
        cfg,
        num_clients=clients,
        fraction=1.0,
        sampling="fixed",
        rounds=rounds,
        randomness=SecretRandomness(),
    )


# ----------------------------------------------------------------------------- the client's share


def test_a_share_is_the_clipped_update_plus_noise_of_z_c_over_root_n() -> None:
    """A client's vector: its update clipped to C (integers zero: the server keeps them), plus
    N(0, s^2) with s = z C / sqrt(n), z the multiplier that still holds with r_min shares."""
    aggregator = _distributed(10, z=1.0, clip=2.0, min_replies=0.5)
    assert aggregator.min_shares == 5
    assert aggregator.noise_multiplier == pytest.approx(math.sqrt(2))  # z_min sqrt(n / r_min)
    std = aggregator.share_std()
    assert std == pytest.approx(math.sqrt(2) * 2.0 / math.sqrt(10))
    glob = {"w": torch.zeros(60_000), "b": torch.zeros(40_000), "n": torch.tensor(3)}
    state = {"w": torch.full((60_000,), 0.5), "b": torch.zeros(40_000), "n": torch.tensor(9)}
    keys = ["w", "b", "n"]
    clean = noised_share(glob, state, keys=keys, clip_norm=2.0, weight=1.0, std=0.0, rng=None)
    assert flat_norm({k: clean[k] for k in ("w", "b")}) == pytest.approx(2.0, rel=1e-5)
    assert torch.equal(clean["n"], torch.zeros(1).reshape(()))
    rng = SecretRandomness(3).generator(0, SHARE, 0)
    sent = noised_share(glob, state, keys=keys, clip_norm=2.0, weight=0.5, std=std, rng=rng)
    noise = torch.cat([sent["w"] - clean["w"] * 0.5, sent["b"] - clean["b"] * 0.5]).double()
    n = noise.numel()
    # The sample std of n normals has standard error std / sqrt(2 n); allow 4 of them.
    assert abs(float(noise.std()) - std) < 4 * std / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 4 * std / math.sqrt(n)
    # A client with nothing to send still sends its share (its absence would show).
    alone = noised_share(glob, None, keys=keys, clip_norm=2.0, weight=0.0, std=std, rng=rng)
    assert 0.9 * std < float(alone["w"].std()) < 1.1 * std
    with pytest.raises(ValueError, match="weight"):
        noised_share(glob, state, keys=keys, clip_norm=2.0, weight=1.5, std=std, rng=rng)


def test_a_share_comes_from_a_fresh_os_secret_not_the_run_seed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drawn: list[int] = []
    real = secrets.randbits

    def randbits(k: int) -> int:
        drawn.append(k)
        return real(k)

    monkeypatch.setattr(secrets, "randbits", randbits)
    first = share_generator(None, 0, 1).standard_normal(16)
    second = share_generator(None, 0, 1).standard_normal(16)
    assert drawn == [256, 256]  # a fresh secret from the OS for each share
    assert not np.array_equal(first, second)
    # What the server tells a client: the clip norm, the deviation, no seed (-1) unless the run
    # is a reproducible (test-only) one.
    aggregator = _distributed(5)
    task = secagg._private_task(aggregator)
    assert task[secagg._DP_SEED] == -1
    assert task[secagg._DP_SHARE] == pytest.approx(aggregator.share_std())


def test_with_the_run_config_and_seed_the_server_cannot_regenerate_the_noise() -> None:
    """The attack that recovers the seeded noise of a run with ``reproducible_noise`` (the
    residual is 0: the attack has power) leaves a secret share's noise whole (the residual has
    the share's deviation)."""
    seed, round_index, std = 17, 4, 0.3
    glob = {"w": torch.zeros(20_000)}
    update = {"w": torch.full((20_000,), 1e-3)}

    def client(seed_sent: int) -> dict[str, torch.Tensor]:
        # As the client does it (flower/secagg.py): -1 means a secret of its own.
        rng = share_generator(None if seed_sent < 0 else seed_sent, round_index, 2)
        return noised_share(glob, update, keys=["w"], clip_norm=1.0, weight=1.0, std=std, rng=rng)

    clean = noised_share(glob, update, keys=["w"], clip_norm=1.0, weight=1.0, std=0.0, rng=None)

    def residual(sent: dict[str, torch.Tensor]) -> float:
        regenerated = share_generator(seed, round_index, 2).standard_normal(20_000, np.float32)
        left = sent["w"] - torch.from_numpy(regenerated) * std - clean["w"]
        return float(left.std())

    assert residual(client(seed)) < 1e-6
    assert residual(client(-1)) == pytest.approx(math.sqrt(2) * std, rel=0.05)


# ----------------------------------------------------------------------------- the ledger


def test_a_round_is_accounted_with_the_noise_shares_its_sum_holds() -> None:
    """Shares of dropped clients are missing: a sum of r of n shares has multiplier
    z sqrt(r / n); the ledger records that, and the mean still divides by n."""
    n = 10
    aggregator = _distributed(n, z=1.0, min_replies=0.5)
    z_full = aggregator.noise_multiplier
    glob = {"w": torch.zeros(4), "n": torch.tensor(2)}
    history = []
    for shares in (10, 7, 5):
        total = {"w": torch.full((4,), float(shares))}
        new_state, record = aggregator.release_sum(glob, SecureSum(total, shares))
        history.append(record)
        torch.testing.assert_close(new_state["w"], torch.full((4,), shares / n))
        assert torch.equal(new_state["n"], glob["n"])
        assert record["dp_noise_shares"] == shares
        assert record["dp_noise_multiplier"] == pytest.approx(z_full * math.sqrt(shares / n))
        assert record["dp_noise_std"] == pytest.approx(z_full * math.sqrt(shares / n) / n)
    # The fewest shares (r_min = 5) carry exactly the planned multiplier.
    assert history[-1]["dp_noise_multiplier"] == pytest.approx(1.0)
    charges = ledger(history)
    assert history[-1]["dp_epsilon"] == pytest.approx(ledger_epsilon(charges, DELTA))
    summary = privacy_summary(history, aggregator.config)
    assert summary["dp_epsilon"] == pytest.approx(ledger_epsilon(charges, DELTA))
    assert 0 < summary["dp_range_delta"] < 1e-12


def test_a_target_is_met_even_when_only_the_fewest_shares_arrive() -> None:
    rounds, n = 5, 8
    aggregator = _distributed(n, z=None, target=4.0, rounds=rounds, min_replies=0.75)
    assert aggregator.min_shares == 6
    glob = {"w": torch.zeros(2)}
    history = [
        aggregator.release_sum(glob, SecureSum({"w": torch.zeros(2)}, 6))[1] for _ in range(rounds)
    ]
    assert 3.9 < history[-1]["dp_epsilon"] <= 4.0
    # Every client replying spends less.
    full = _distributed(n, z=None, target=4.0, rounds=rounds, min_replies=0.75)
    for _ in range(rounds):
        _, last = full.release_sum(glob, SecureSum({"w": torch.zeros(2)}, n))
    assert last["dp_epsilon"] < 3.9


def test_against_the_server_no_sampling_amplification_holds() -> None:
    """The server knows the cohorts: its epsilon composes, for the most exposed client, the
    Gaussians of the rounds it took part in."""
    z = 2.0
    charge = round_charge(num_clients=100, fraction=0.1, sampling="fixed", noise_multiplier=z)
    history = [
        {"round": 1, "clients": [1, 2], **charge.to_record()},
        {"round": 2, "clients": [2, 3], **charge.to_record()},
        {"round": 3, "clients": [4, 5], **charge.to_record()},
    ]
    alone = round_charge(
        num_clients=1, fraction=1.0, sampling="fixed", noise_multiplier=z / math.sqrt(2)
    )
    assert server_epsilon(history, DELTA) == pytest.approx(ledger_epsilon([alone], DELTA))
    assert server_epsilon(history, DELTA) > ledger_epsilon(ledger(history), DELTA)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["privacy.dp=adaptive", "privacy.clip_norm=1"], "adaptive clipping"),
        (["federation.sampling=poisson", "federation.fraction=0.5"], "fixed cohort size"),
        (["privacy.min_replies=0.3"], "privacy.min_replies"),
        ([], "only inside SecAgg"),  # the in-process simulator has no secure aggregation
    ],
)
def test_distributed_dp_refuses_what_cannot_hold_in_one_sentence(
    sets: list[str], message: str
) -> None:
    from helpers import one_sentence

    with pytest.raises(ConfigError, match=message) as error:
        cfg = config.load(SMOKE, [*TINY, *DISTRIBUTED, *sets])
        check_setup(cfg)
    assert one_sentence(str(error.value))


def test_distributed_dp_is_accepted_with_secure_aggregation() -> None:
    sets = [*TINY, *DISTRIBUTED, "method.name=fedalignuniform", "federation.num_clients=4"]
    cfg = config.load(SMOKE, sets)
    check_setup(cfg, secure_aggregation=True)
    built = build_experiment(cfg, log=lambda _m: None)
    secagg.check_secure_aggregation(cfg, built.method)
    # Central DP under SecAgg+ stays refused, pointing at the distributed mode.
    central = config.load(SMOKE, [*sets, "privacy.mode=central"])
    with pytest.raises(ConfigError, match=r"privacy\.mode = .distributed."):
        secagg.check_secure_aggregation(central, built.method)


def test_the_reconstruction_threshold_is_the_fewest_shares() -> None:
    assert [min_noise_shares(n, 0.5) for n in (2, 3, 4, 10, 101)] == [2, 2, 2, 5, 51]
    assert min_noise_shares(10, 1.0) == 10 and min_noise_shares(10, 0.75) == 8


def test_a_halted_secagg_round_runs_no_callbacks_and_says_so() -> None:
    """SecAgg+ halts a round with fewer clients left than its threshold: ``aggregate_fit`` is
    never called, so the last record is the previous round's and must not be handed to the
    callbacks (metrics file, checkpoints) again as if it were this round's."""
    from types import SimpleNamespace

    seen: list[int] = []
    said: list[str] = []
    inner = SimpleNamespace(
        history=[{"round": 1}],
        callbacks=[lambda record, _model: seen.append(record["round"])],
        global_model=torch.nn.Linear(1, 1),
        log=said.append,
    )
    strategy = secagg.SecAggStrategy(inner)  # type: ignore[arg-type]
    strategy.evaluate(1, None)  # type: ignore[arg-type]
    strategy.evaluate(2, None)  # type: ignore[arg-type]
    assert seen == [1]
    assert len(said) == 1 and "round 2: secure aggregation halted" in said[0]
