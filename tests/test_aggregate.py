"""The foreach FedAvg against a plain weighted average written one entry at a time."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedssd.aggregate import FedAvgAccumulator, fedavg
from fedssd.models import build_model


def plain_average(
    states: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """The definition: sum_i w_i x_i / sum_i w_i per entry, in float64."""
    total = sum(weights)
    out = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += weight * state[key].double()
        out[key] = acc / total
    return out


def random_states(
    seed: int, clients: int, dtype: torch.dtype = torch.float32
) -> list[dict[str, torch.Tensor]]:
    rng = torch.Generator().manual_seed(seed)
    return [
        {
            "conv.weight": torch.randn(4, 3, 3, 3, generator=rng).to(dtype),
            "bn.running_mean": torch.randn(4, generator=rng).to(dtype),
            "bn.num_batches_tracked": torch.randint(0, 1000, (), generator=rng),
            "counts": torch.randint(-50, 50, (5,), generator=rng, dtype=torch.int32),
            "fc.bias": torch.randn(7, generator=rng).to(dtype),
        }
        for _ in range(clients)
    ]


def test_closed_form_two_clients() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([5.0, -2.0]), "n": torch.tensor(8)}
    out = fedavg([a, b], [1.0, 3.0])
    torch.testing.assert_close(out["w"], (a["w"] + 3 * b["w"]) / 4)
    assert out["n"].item() == 7 and out["n"].dtype == torch.int64


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    weights=st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=12).filter(
        lambda w: sum(w) > 1e-3
    ),
)
def test_equals_the_plain_weighted_average_on_float_entries(
    seed: int, weights: list[float]
) -> None:
    states = random_states(seed, len(weights))
    out = fedavg(states, weights)
    expected = plain_average(states, weights)
    for key, value in out.items():
        assert value.dtype == states[0][key].dtype and value.shape == states[0][key].shape
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), expected[key], atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    weights=st.lists(st.integers(0, 50), min_size=1, max_size=10).filter(lambda w: sum(w) > 0),
)
def test_integer_entries_are_the_exact_average_rounded_half_to_even(
    seed: int, weights: list[int]
) -> None:
    states = random_states(seed, len(weights))
    out = fedavg(states, [float(w) for w in weights])
    total = sum(weights)
    for key in ("bn.num_batches_tracked", "counts"):
        assert out[key].dtype == states[0][key].dtype
        stacked = torch.stack([s[key].reshape(-1) for s in states]).tolist()
        for column, value in enumerate(out[key].reshape(-1).tolist()):
            exact = sum(Fraction(w) * row[column] for w, row in zip(weights, stacked, strict=True))
            # Python's round() on a Fraction rounds half to even, like torch.round.
            assert value == round(exact / total)


def test_half_ties_round_to_even() -> None:
    states = [{"n": torch.tensor([1, 2, 3])}, {"n": torch.tensor([2, 3, 4])}]
    assert fedavg(states, [1.0, 1.0])["n"].tolist() == [2, 2, 4]


def test_low_precision_entries_keep_their_dtype_and_are_summed_in_float32() -> None:
    states = random_states(3, 6, dtype=torch.bfloat16)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    out = fedavg(states, weights)
    expected = plain_average(states, weights)
    assert out["conv.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(
        out["conv.weight"].double(), expected["conv.weight"], atol=1e-2, rtol=1e-2
    )


def test_streamed_accumulator_equals_fedavg_and_inputs_are_untouched() -> None:
    states = random_states(5, 7)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    weights = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    accumulator = FedAvgAccumulator(states[0])
    for state, weight in zip(states, weights, strict=True):
        accumulator.add(state, weight)
    streamed = accumulator.result()
    batch = fedavg(states, weights)
    assert list(streamed) == list(states[0])
    for key in batch:
        assert torch.equal(streamed[key], batch[key])
    for state, copy in zip(states, before, strict=True):
        for key in state:
            assert torch.equal(state[key], copy[key])


def test_real_model_state_dicts_with_batchnorm() -> None:
    torch.manual_seed(0)
    models = [build_model(encoder="small_cnn", width=4, projector_hidden=8) for _ in range(3)]
    for i, model in enumerate(models):
        for buffer in model.buffers():
            buffer.add_(i + 1)
    states = [m.state_dict() for m in models]
    weights = [2.0, 1.0, 1.0]
    out = fedavg(states, weights)
    expected = plain_average(states, weights)
    for key, value in out.items():
        if value.is_floating_point():
            torch.testing.assert_close(value.double(), expected[key], atol=1e-6, rtol=1e-6)
        else:
            assert value.item() == round(float(expected[key]))


def test_rejects_bad_input() -> None:
    state = {"w": torch.zeros(2)}
    with pytest.raises(ValueError):
        fedavg([state, state], [1.0, -1.0])
    with pytest.raises(ValueError):
        fedavg([state, {"v": torch.zeros(2)}], [1.0, 1.0])
    with pytest.raises(ValueError):
        fedavg([state], [0.0])
    with pytest.raises(ValueError):
        fedavg([state], [1.0, 1.0])
    with pytest.raises(ValueError):
        FedAvgAccumulator(state).result()
