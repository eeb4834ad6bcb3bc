"""The batched augmentation against the per-image reference of the benchmark (the released
code's way: one image at a time, every random choice drawn separately).

Two kinds of check: with the same random choices the two pipelines give the same pixels, and with
their own random draws on a fixed seed the distributions of the choices (crop scale, aspect ratio,
flip, jitter and grayscale rates, jitter factor ranges, operation order) and of the output
statistics agree within a few standard errors.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from fedssd.data.augment import SSL_AUGMENT, AugmentParams, apply_params, augment, sample_params

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.reference import (
    SampleParams,
    apply_image_params,
    sample_image_params,
)

N = 3000
SIZE = 32


def reference_params(n: int, seed: int) -> list[SampleParams]:
    rng = torch.Generator().manual_seed(seed)
    return [sample_image_params(SIZE, SIZE, SSL_AUGMENT, rng) for _ in range(n)]


def as_batch(params: list[SampleParams]) -> AugmentParams:
    return AugmentParams(
        boxes=torch.tensor([p.box for p in params]),
        flip=torch.tensor([p.flip for p in params]),
        jitter=torch.tensor([p.jitter for p in params]),
        factors=torch.tensor([p.factors for p in params]),
        order=torch.tensor([p.order for p in params]),
        grayscale=torch.tensor([p.grayscale for p in params]),
    )


def images(n: int, seed: int) -> torch.Tensor:
    # Smooth random colour fields: closer to photographs than pixel noise, so that crops differ.
    rng = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=rng)
    fine = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")
    return (255 * fine).round().to(torch.uint8)


def tolerance(p: float, n: int, sigmas: float = 4.5) -> float:
    """``sigmas`` standard errors of the difference of two rates estimated from n draws each."""
    return sigmas * math.sqrt(2 * p * (1 - p) / n)


def assert_quantiles_close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    torch.testing.assert_close(a.double().quantile(q), b.double().quantile(q), atol=atol, rtol=0)


def test_same_choices_give_the_same_pixels() -> None:
    params = reference_params(48, seed=1)
    x = images(48, seed=2)
    batched = apply_params(x, as_batch(params), SSL_AUGMENT)
    for i, p in enumerate(params):
        torch.testing.assert_close(
            batched[i], apply_image_params(x[i], p, SSL_AUGMENT), atol=5e-5, rtol=0
        )


def test_random_choices_match_in_distribution() -> None:
    batched = sample_params(
        N, height=SIZE, width=SIZE, config=SSL_AUGMENT, generator=torch.Generator().manual_seed(3)
    )
    reference = as_batch(reference_params(N, seed=4))
    areas = [p.boxes[:, 2] * p.boxes[:, 3] / SIZE**2 for p in (batched, reference)]
    assert_quantiles_close(areas[0], areas[1], atol=0.035)
    assert areas[0].min() >= 0.06 and areas[0].max() <= 1.0
    aspects = [(p.boxes[:, 3] / p.boxes[:, 2]).log() for p in (batched, reference)]
    assert_quantiles_close(aspects[0], aspects[1], atol=0.05)
    for name, rate in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2)):
        a, b = (getattr(p, name).double().mean().item() for p in (batched, reference))
        assert abs(a - rate) < tolerance(rate, N) and abs(a - b) < tolerance(rate, N), name
    for column, (low, high) in enumerate([(0.2, 1.8)] * 3 + [(-0.2, 0.2)]):
        for p in (batched, reference):
            factor = p.factors[:, column]
            assert factor.min() >= low and factor.max() <= high
            # N uniform draws come within 2% of the range of each end with near certainty.
            assert factor.min() < low + 0.02 * (high - low)
            assert factor.max() > high - 0.02 * (high - low)
        assert_quantiles_close(batched.factors[:, column], reference.factors[:, column], 0.06)
    # Each operation lands in each slot a quarter of the time.
    for p in (batched, reference):
        slot_rates = torch.nn.functional.one_hot(p.order, 4).double().mean(dim=0)
        assert (slot_rates - 0.25).abs().max() < tolerance(0.25, N)


def test_outputs_match_in_distribution() -> None:
    n = 500
    x = images(n, seed=5)
    batched = augment(x, SSL_AUGMENT, generator=torch.Generator().manual_seed(6))
    rng = torch.Generator().manual_seed(7)
    reference = torch.stack(
        [
            apply_image_params(x[i], sample_image_params(SIZE, SIZE, SSL_AUGMENT, rng), SSL_AUGMENT)
            for i in range(n)
        ]
    )
    for out in (batched, reference):
        assert out.shape == (n, 3, SIZE, SIZE) and out.min() >= 0 and out.max() <= 1
    gray = [
        ((o[:, 0] == o[:, 1]) & (o[:, 1] == o[:, 2])).all(dim=(1, 2)) for o in (batched, reference)
    ]
    rates = [g.double().mean().item() for g in gray]
    assert abs(rates[0] - rates[1]) < tolerance(0.2, n)
    assert_quantiles_close(batched.mean(dim=(1, 2, 3)), reference.mean(dim=(1, 2, 3)), 0.04)
    assert_quantiles_close(batched.std(dim=(2, 3)).mean(1), reference.std(dim=(2, 3)).mean(1), 0.03)
