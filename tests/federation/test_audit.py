"""The one-run privacy audit's statistics and canaries (Steinke, Nasr, Jagielski 2023)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import special

from fedssd.config import PrivacyConfig
from fedssd.errors import ConfigError
from fedssd.federation.audit import (
    Canaries,
    CanaryAggregator,
    Layout,
    audit_bound,
    audited_layout,
    canary_scores,
    canary_update,
    draw_canaries,
    epsilon_lower_bound,
    guess,
    p_value,
)
from fedssd.federation.privacy import SecretRandomness, clip_delta
from fedssd.methods import ClientUpdate


def _all_right(guesses: int, beta: float) -> float:
    """The closed form for delta = 0 and every guess right: P[W >= r] = q^r <= beta, i.e.
    q = beta^(1/r) and epsilon = logit(q)."""
    return float(special.logit(beta ** (1 / guesses)))


# ----------------------------------------------------------------------------- the statistics


@pytest.mark.parametrize("guesses", [1, 5, 10, 100, 1000])
def test_all_right_guesses_match_the_closed_form_for_pure_dp(guesses: int) -> None:
    bound = epsilon_lower_bound(
        canaries=1000, guesses=guesses, correct=guesses, delta=0.0, beta=0.05
    )
    # One right guess happens half the time at epsilon = 0: it shows nothing (logit < 0).
    assert bound == pytest.approx(max(0.0, _all_right(guesses, 0.05)), abs=1e-7)


def test_the_bound_grows_with_the_right_guesses() -> None:
    # Hand values of the closed form: r = 10 gives logit(0.05^0.1) = 1.0518; r = 100, 3.4930.
    assert _all_right(10, 0.05) == pytest.approx(1.0518, abs=1e-4)
    assert _all_right(100, 0.05) == pytest.approx(3.4930, abs=1e-4)
    bounds = [
        epsilon_lower_bound(canaries=1000, guesses=r, correct=r, delta=1e-5, beta=0.05)
        for r in (10, 30, 100, 300, 1000)
    ]
    assert bounds == sorted(bounds) and bounds[0] > 0
    # The delta term only lowers the bound, and not by much when m delta is small.
    assert bounds[2] < _all_right(100, 0.05)
    assert bounds[2] > _all_right(100, 0.05) - 0.05


def test_p_value_by_hand() -> None:
    # epsilon = 0: q = 1/2. P[Binomial(10, 1/2) >= 8] = (45 + 10 + 1) / 1024.
    assert p_value(canaries=10, guesses=10, correct=8, epsilon=0, delta=0) == pytest.approx(
        56 / 1024
    )
    # v = r = 1: f(1) = q, f(0) = 1, so P <= q + 2 m delta (1 - q).
    assert p_value(canaries=10, guesses=1, correct=1, epsilon=0, delta=0.01) == pytest.approx(
        0.5 + 2 * 10 * 0.01 * 0.5
    )
    # v = r = 2 at q = 1/2: f(2) = 1/4; i = 1: P[B = 1] = 1/2; i = 2: (1 - 1/4) / 2 = 3/8.
    assert p_value(canaries=5, guesses=2, correct=2, epsilon=0, delta=0.01) == pytest.approx(
        0.25 + 2 * 5 * 0.01 * 0.5
    )
    # At epsilon = log 3, q = 3/4: f(2) = 9/16; i = 1: 2 (3/4)(1/4) = 3/8; i = 2: (7/16) / 2.
    assert p_value(
        canaries=5, guesses=2, correct=2, epsilon=math.log(3), delta=0.01
    ) == pytest.approx(9 / 16 + 2 * 5 * 0.01 * 3 / 8)
    assert p_value(canaries=5, guesses=2, correct=0, epsilon=3, delta=0.0) == 1.0


@pytest.mark.parametrize(("guesses", "correct"), [(20, 15), (200, 180), (1000, 990), (50, 50)])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_grows_with_epsilon_and_falls_with_the_right_guesses(
    guesses: int, correct: int, delta: float
) -> None:
    # The bisection of epsilon_lower_bound relies on the first: its answer is then the only
    # crossing of beta.
    values = [
        p_value(canaries=1000, guesses=guesses, correct=correct, epsilon=e, delta=delta)
        for e in np.linspace(0, 12, 241)
    ]
    assert all(a <= b + 1e-15 for a, b in itertools.pairwise(values))
    fewer = p_value(canaries=1000, guesses=guesses, correct=correct - 5, epsilon=1, delta=delta)
    assert fewer >= values[20]


def test_the_bound_is_where_the_p_value_crosses_beta() -> None:
    bound = epsilon_lower_bound(canaries=1000, guesses=200, correct=190, delta=1e-5, beta=0.05)
    assert 0 < bound < 10
    assert p_value(canaries=1000, guesses=200, correct=190, epsilon=bound, delta=1e-5) <= 0.05
    assert p_value(canaries=1000, guesses=200, correct=190, epsilon=bound + 1e-6, delta=1e-5) > 0.05
    # Guesses no better than chance show nothing.
    assert epsilon_lower_bound(canaries=1000, guesses=200, correct=100, delta=0, beta=0.05) == 0


def test_guesses_take_the_highest_in_and_the_lowest_out() -> None:
    scores = np.array([0.3, -2.0, 5.0, 0.0, 1.0, -1.0])
    assert guess(scores, 2).tolist() == [0, -1, 1, 0, 1, -1]
    assert guess(scores, 0).tolist() == [0] * 6
    assert guess(scores, 3).tolist() == [1, -1, 1, -1, 1, -1]
    with pytest.raises(ValueError):
        guess(scores, 4)


def test_audit_bound_of_perfect_scores_is_the_all_right_value() -> None:
    included = np.random.default_rng(0).random(1000) < 0.5
    bound = audit_bound(included.astype(float), included, delta=0.0, fractions=(0.1, 0.25))
    # Both candidates guess right every time; the larger (r = 500) is tested at beta / 2.
    assert (bound.guesses, bound.correct) == (500, 500)
    assert bound.epsilon == pytest.approx(_all_right(500, 0.05 / 2), abs=1e-7)


@pytest.mark.slow
def test_audit_bound_stays_below_a_gaussian_mechanisms_epsilon() -> None:
    # A Gaussian mechanism of sensitivity 1 and noise 1 (mu = 1) is (epsilon, 1e-5)-DP with
    # epsilon = 4.4 (Balle & Wang 2018: delta(4.4) = 9.1e-6); over 10 draws of the canaries'
    # coins and scores the audit's bound stays below it, and shows something every time.
    bounds = []
    for seed in range(10):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        scores = included + rng.standard_normal(1000)
        bounds.append(audit_bound(scores, included, delta=1e-5).epsilon)
    assert min(bounds) > 0
    assert max(bounds) < 4.4


# ----------------------------------------------------------------------------- the canaries


def _global() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {
        "conv.weight": torch.randn(6, 2, 3, 3, generator=gen),
        "bn.running_var": torch.rand(6, generator=gen) + 0.5,
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.long),
        "extras.local.weight": torch.randn(4, generator=gen),
    }


def test_canaries_are_orthonormal_and_drawn_from_the_audit_seed_alone() -> None:
    first = draw_canaries(50, 120, seed=5)
    again = draw_canaries(50, 120, seed=5)
    other = draw_canaries(50, 120, seed=6)
    gram = first.directions.double() @ first.directions.double().T
    assert torch.allclose(gram, torch.eye(50, dtype=torch.float64), atol=1e-5)
    assert torch.equal(first.directions, again.directions)
    assert np.array_equal(first.included, again.included)
    assert not torch.equal(first.directions, other.directions)
    assert 10 < first.included.sum() < 40
    with pytest.raises(ConfigError, match="between 2 and 120 canaries"):
        draw_canaries(121, 120, seed=5)


def test_layout_takes_the_floating_entries_a_client_sends() -> None:
    state = _global()
    layout = audited_layout(state, frozenset({"extras.local.weight"}))
    assert layout.keys == ("conv.weight", "bn.running_var")
    assert layout.dimension == 108 + 6
    flat = layout.flatten(state)
    back = layout.unflatten(flat)
    assert torch.equal(back["conv.weight"].float(), state["conv.weight"])


def test_canary_update_is_the_direction_at_the_clip_norm_and_passes_clipping() -> None:
    state = _global()
    sent = {k: v for k, v in state.items() if k != "extras.local.weight"}
    layout = audited_layout(sent)
    canaries = draw_canaries(3, layout.dimension, seed=1)
    update = canary_update(sent, layout, canaries.directions[1], norm=2.5, client_id=9)
    assert update.state.keys() == sent.keys() and update.weight == 1.0
    moved = layout.flatten(update.state) - layout.flatten(sent)
    assert torch.allclose(moved, 2.5 * canaries.directions[1].double(), atol=1e-5)
    assert torch.equal(update.state["bn.num_batches_tracked"], sent["bn.num_batches_tracked"])
    _, norm = clip_delta(sent, update.state, 2.5)
    assert norm == pytest.approx(2.5, rel=1e-5)


def test_scores_sum_the_observed_changes_of_every_round() -> None:
    state = _global()
    layout = audited_layout(state)
    canaries = draw_canaries(4, layout.dimension, seed=2)
    rounds = [state]
    for step in range(3):
        change = layout.unflatten((step + 1.0) * canaries.directions[0].double())
        rounds.append({k: v + change[k].float() if k in change else v for k, v in state.items()})
        state = rounds[-1]
    scores = canary_scores(canaries, layout, rounds)
    # 1 + 2 + 3 along canary 0, nothing along the others (orthogonal).
    assert scores == pytest.approx([6.0, 0.0, 0.0, 0.0], abs=1e-4)


def _aggregator(canaries: Canaries, layout: Layout, **changes: object) -> CanaryAggregator:
    settings: dict[str, object] = {
        "num_clients": 2,
        "fraction": 1.0,
        "sampling": "fixed",
        "rounds": 1,
        "randomness": SecretRandomness(0),
        "canaries": canaries,
        "layout": layout,
        "audit_seed": 11,
    }
    settings.update(changes)
    config = PrivacyConfig(dp="fixed", clip_norm=1.5, noise_multiplier=0.0)
    return CanaryAggregator(config, **settings)  # type: ignore[arg-type]


def test_canary_aggregator_adds_the_included_canaries_to_the_sum() -> None:
    state = _global()
    local = frozenset({"extras.local.weight"})
    sent = {k: v for k, v in state.items() if k not in local}
    layout = audited_layout(state, local)
    canaries = draw_canaries(6, layout.dimension, seed=4)
    aggregator = _aggregator(canaries, layout)
    real = [
        ClientUpdate(
            k, {n: v + 0.01 * (k + 1) if v.is_floating_point() else v for n, v in sent.items()}, 1.0
        )
        for k in range(2)
    ]
    new_state, record = aggregator.aggregate(state, real, keys=sent.keys(), round_index=0)
    clipped = [layout.flatten(clip_delta(sent, u.state, 1.5)[0]) for u in real]
    # Every client takes part: the canaries in, each at the clip norm; the sum over the public
    # cohort size, 2 (the real clients).
    inside = canaries.directions[canaries.included].double().sum(0)
    expected = (sum(clipped) + 1.5 * inside) / 2
    assert torch.allclose(layout.flatten(new_state) - layout.flatten(state), expected, atol=1e-5)
    assert torch.equal(new_state["extras.local.weight"], state["extras.local.weight"])
    assert record["dp_epsilon"] == math.inf
    assert aggregator.taking_part(3).tolist() == np.flatnonzero(canaries.included).tolist()


def test_under_poisson_sampling_a_canary_takes_part_at_the_sampling_rate() -> None:
    layout = audited_layout(_global())
    canaries = draw_canaries(100, layout.dimension, seed=4)
    aggregator = _aggregator(canaries, layout, num_clients=50, fraction=0.3, sampling="poisson")
    rounds = [aggregator.taking_part(r) for r in range(40)]
    # Only canaries that are in, about 30 % of them in each round, a new draw every round, from
    # the audit's seed alone.
    assert all(canaries.included[chosen].all() for chosen in rounds)
    share = np.mean([len(chosen) for chosen in rounds]) / canaries.included.sum()
    assert 0.25 < share < 0.35
    assert len({tuple(chosen) for chosen in rounds}) == 40
    again = _aggregator(canaries, layout, num_clients=50, fraction=0.3, sampling="poisson")
    assert again.taking_part(7).tolist() == rounds[7].tolist()
