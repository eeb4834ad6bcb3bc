"""The loss terms against closed forms and slow explicit loops.

The terms are the SSD paper's (Fang et al., ICCV 2025), as docs/methods.md writes them.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedssd import losses


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return losses.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


def test_uniformity_of_identical_points_is_zero() -> None:
    z = unit(1, 8).repeat(16, 1)
    assert losses.uniformity(z).item() == pytest.approx(0.0, abs=1e-6)


def test_uniformity_of_two_antipodal_points() -> None:
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # one pair at squared distance 4: log(exp(-2 * 4)) = -8
    assert losses.uniformity(z, t=2.0).item() == pytest.approx(-8.0)


def test_uniformity_matches_an_explicit_pair_loop() -> None:
    z = unit(12, 5, seed=1)
    total, pairs = 0.0, 0
    for i in range(12):
        for j in range(i + 1, 12):
            total += math.exp(-2.0 * float((z[i] - z[j]).pow(2).sum()))
            pairs += 1
    assert losses.uniformity(z).item() == pytest.approx(math.log(total / pairs), rel=1e-5)


def test_alignment_is_mean_squared_distance_and_symmetric() -> None:
    z1, z2 = unit(10, 4, 2), unit(10, 4, 3)
    expected = sum(float((z1[i] - z2[i]).pow(2).sum()) for i in range(10)) / 10
    assert losses.alignment(z1, z2).item() == pytest.approx(expected, rel=1e-6)
    assert losses.alignment(z2, z1).item() == pytest.approx(expected, rel=1e-6)
    assert losses.alignment(z1, z1).item() == 0.0


def test_dsr_paper_matches_a_per_sample_loop_and_stops_the_target_gradient() -> None:
    z = unit(6, 8, 4).requires_grad_(True)
    scale = torch.ones(8)
    scale[[1, 5]] = 10.0
    loss = losses.dsr_paper(z, scale)
    zd = z.detach()
    expected = sum(float((zd[i] - zd[i] * scale).pow(2).sum()) for i in range(6)) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dz mean_i ||z_i - sg(z_i * d)||^2 = 2 (z - z * d) / N: the target contributes nothing
    assert z.grad is not None
    torch.testing.assert_close(z.grad, 2 * (z.detach() - z.detach() * scale) / 6)


def test_dsr_released_matches_a_per_sample_loop() -> None:
    d, n = 8, 5
    z = unit(n, d, 5)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(6)))
    scale = torch.ones(d)
    scale[[0, 3]] = 10.0
    # the released code builds S = Q with the chosen columns scaled by sqrt(alpha)
    s = basis * scale.sqrt()
    total = 0.0
    for i in range(n):
        target = z[i] @ s @ s.T
        target = target / target.norm()
        total += float((z[i] - target).pow(2).sum())
    expected = math.sqrt(total) / n
    assert losses.dsr_released(z, basis, scale).item() == pytest.approx(expected, rel=1e-5)


def test_dsr_released_is_much_weaker_than_the_paper_form_at_batch_128() -> None:
    z = unit(128, 64, 7).requires_grad_(True)
    basis = torch.eye(64)
    scale = torch.ones(64)
    scale[:6] = 10.0
    losses.dsr_paper(z, scale).backward()
    paper = z.grad.norm().item()  # type: ignore[union-attr]
    z.grad = None
    losses.dsr_released(z, basis, scale).backward()
    released = z.grad.norm().item()  # type: ignore[union-attr]
    assert released < paper / 5


def test_pd_kl_direction_matches_an_explicit_sum() -> None:
    h = torch.randn(4, 6, generator=torch.Generator().manual_seed(8))
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    temperature = 0.5
    total = 0.0
    for i in range(4):
        p = torch.softmax(z[i] / temperature, dim=0)
        q = torch.softmax(h[i] / temperature, dim=0)
        total += float((p * (p / q).log()).sum())
    assert losses.projector_distillation_kl(h, z, temperature).item() == pytest.approx(
        total / 4, rel=1e-5
    )
    # KL is not symmetric: the direction matters
    assert losses.projector_distillation_kl(z, h, temperature).item() != pytest.approx(total / 4)


def test_pd_gradients_reach_both_sides() -> None:
    h = torch.randn(4, 6, requires_grad=True)
    z = torch.randn(4, 6, requires_grad=True)
    losses.projector_distillation_kl(h, z).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_pd_of_equal_inputs_is_zero_and_mse_variant() -> None:
    h = torch.randn(3, 5)
    assert losses.projector_distillation_kl(h, h.clone()).item() == pytest.approx(0.0, abs=1e-6)
    z = h + 1.0
    assert losses.projector_distillation_mse(h, z).item() == pytest.approx(1.0)


def test_dsr_released_stops_the_target_gradient() -> None:
    d, n = 6, 4
    z = unit(n, d, 11).requires_grad_(True)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(12)))
    scale = torch.ones(d)
    scale[[2]] = 10.0
    loss = losses.dsr_released(z, basis, scale)
    loss.backward()
    target = losses.normalize(((z.detach() @ basis) * scale) @ basis.T)
    diff = z.detach() - target
    # d/dZ ||Z - P||_F / N with P constant = (Z - P) / (N ||Z - P||_F)
    assert z.grad is not None
    torch.testing.assert_close(z.grad, diff / (n * diff.norm()))


BASIS = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(5)))[0]


@pytest.mark.parametrize(
    "term",
    [
        lambda z, h: losses.uniformity(z, 2.0),
        lambda z, h: losses.dsr_paper(z, torch.linspace(1.0, 10.0, 8)),
        lambda z, h: losses.dsr_released(z, BASIS, torch.linspace(1.0, 10.0, 8)),
        lambda z, h: losses.projector_distillation_kl(h, z, 0.5),
        lambda z, h: losses.projector_distillation_mse(h, z),
    ],
    ids=["uniformity", "dsr_paper", "dsr_released", "pd_kl", "pd_mse"],
)
def test_a_stack_of_views_gives_each_views_value(term: Any) -> None:
    torch.manual_seed(3)
    z = losses.normalize(torch.randn(2, 16, 8))
    h = torch.randn(2, 16, 8)
    torch.manual_seed(4)
    stacked = term(z, h)
    torch.manual_seed(4)
    per_view = torch.stack([term(z[0], h[0]), term(z[1], h[1])])
    assert stacked.shape == (2,)
    torch.testing.assert_close(stacked, per_view, rtol=1e-5, atol=1e-6)
