"""NT-Xent, BYOL's regression loss and SimSiam's negative cosine (docs/methods.md)."""

from __future__ import annotations

import math

import pytest
import torch

from fedssd import losses


def slow_nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    """NT-Xent as SimCLR defines it (Chen et al., ICML 2020), one row at a time in float64."""
    v = torch.cat([a, b]).double()
    v = v / v.norm(dim=1, keepdim=True)
    n = a.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        s = [float(v[i] @ v[k]) / tau for k in range(2 * n)]
        denominator = sum(math.exp(s[k]) for k in range(2 * n) if k != i)
        total += -s[positive] + math.log(denominator)
    return total / (2 * n)


def test_nt_xent_pin_value_for_tau_1() -> None:
    # docs/methods.md pin: a = b = (e1, e2): every row has loss log(1 + 2/e) = 0.551445.
    e = torch.eye(2)
    assert float(losses.nt_xent(e, e.clone(), temperature=1.0)) == pytest.approx(0.551445, abs=1e-6)
    assert math.log(1 + 2 / math.e) == pytest.approx(0.551445, abs=1e-6)


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_nt_xent_matches_an_explicit_loop(tau: float) -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g)
    value = float(losses.nt_xent(a.double(), b.double(), temperature=tau))
    assert value == pytest.approx(slow_nt_xent(a, b, tau), rel=1e-10)


def test_nt_xent_is_symmetric_in_the_views_and_scale_free() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    base = losses.nt_xent(a, b, temperature=0.2)
    torch.testing.assert_close(losses.nt_xent(b, a, temperature=0.2), base)
    torch.testing.assert_close(losses.nt_xent(5 * a, 0.1 * b, temperature=0.2), base)


def test_byol_regression_values_and_stop_gradient() -> None:
    p = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0], [1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    loss = losses.byol_regression(p, t)
    # 2 - 2 cos: orthogonal -> 2, parallel -> 0, 45 degrees -> 2 - sqrt(2).
    assert float(loss.detach()) == pytest.approx((2 + 0 + (2 - math.sqrt(2))) / 3, abs=1e-6)
    loss.backward()
    assert t.grad is None
    assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_byol_regression_is_the_squared_distance_of_normalised_vectors() -> None:
    g = torch.Generator().manual_seed(5)
    p, t = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g)
    expected = (losses.normalize(p) - losses.normalize(t)).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(losses.byol_regression(p, t), expected)


def test_negative_cosine_value_and_zero_gradient_through_the_stopped_branch() -> None:
    # SimSiam's stop-gradient (Chen & He, CVPR 2021): the gradient with respect to the branch
    # inside sg is exactly zero.
    weight = torch.tensor([[2.0, -1.0], [0.5, 1.0]], requires_grad=True)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    z = x @ weight  # the projection side, under stop-gradient
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = losses.negative_cosine(p, z)
    cos = torch.nn.functional.cosine_similarity(p.detach(), z.detach(), dim=1)
    assert float(loss.detach()) == pytest.approx(-float(cos.mean()), abs=1e-7)
    loss.backward()
    assert weight.grad is None
    assert p.grad is not None and float(p.grad.abs().sum()) > 0
    same = torch.tensor([[1.0, 1.0]])
    assert float(losses.negative_cosine(same, 2 * same)) == pytest.approx(-1.0)
