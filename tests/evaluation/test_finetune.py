"""Semi-supervised fine-tuning: the stratified labelled subset and the training loop."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedssd.errors import ConfigError, DataError
from fedssd.evaluation.finetune import (
    FinetuneResult,
    FinetuneSettings,
    finetune,
    stratified_fraction,
)
from fedssd.models import SmallCNN

# ---------------------------------------------------------------------------------------------
# stratified_fraction


def _per_class(labels: np.ndarray, chosen: np.ndarray, classes: int) -> list[int]:
    return [int(c) for c in np.bincount(labels[chosen], minlength=classes)]


def test_paper_fractions_of_a_balanced_set_are_exact() -> None:
    labels = np.repeat(np.arange(10), 5000)  # CIFAR-10's training labels, sorted
    rng = np.random.default_rng(0)
    assert _per_class(labels, stratified_fraction(labels, 0.01, rng), 10) == [50] * 10
    assert _per_class(labels, stratified_fraction(labels, 0.1, rng), 10) == [500] * 10


def test_quotas_by_hand_with_at_least_one_per_class() -> None:
    labels = np.repeat(np.arange(3), [100, 50, 10])
    rng = np.random.default_rng(1)
    assert _per_class(labels, stratified_fraction(labels, 0.1, rng), 3) == [10, 5, 1]
    # 1% of 160 is 1.6 -> 2 images: 1 for class 0 (exact 1.0), 1 by the largest remainder (0.5)
    # for class 1, and class 2 (0.1) is raised to one image.
    assert _per_class(labels, stratified_fraction(labels, 0.01, rng), 3) == [1, 1, 1]
    # 25% of [3, 3, 2]: exact [0.75, 0.75, 0.5], total 2 -> the two largest remainders in class
    # order, then the empty class raised to one.
    small = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    assert _per_class(small, stratified_fraction(small, 0.25, rng), 3) == [1, 1, 1]
    assert stratified_fraction(small, 1.0, rng).tolist() == list(range(8))


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=12),
    fraction=st.floats(min_value=0.001, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_subset_keeps_class_proportions(counts: list[int], fraction: float, seed: int) -> None:
    classes = len(counts)
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), counts))
    chosen = stratified_fraction(labels, fraction, np.random.default_rng(seed))
    assert chosen.dtype == np.int64
    assert np.all(np.diff(chosen) > 0)  # sorted, no repeats
    taken = _per_class(labels, chosen, classes)
    for n_c, k_c in zip(counts, taken, strict=True):
        assert 1 <= k_c <= n_c
        # Within one image of the exact share, unless raised to the one-image minimum.
        assert abs(k_c - fraction * n_c) < 1 or (k_c == 1 and fraction * n_c < 1)
    target = math.floor(fraction * labels.size + 0.5)
    assert target <= len(chosen) <= target + classes
    again = stratified_fraction(labels, fraction, np.random.default_rng(seed))
    assert np.array_equal(chosen, again)


def test_subset_depends_on_the_seed() -> None:
    labels = np.repeat(np.arange(4), 250)
    draws = {
        tuple(stratified_fraction(labels, 0.1, np.random.default_rng(seed))) for seed in range(4)
    }
    assert len(draws) == 4


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, math.nan])
def test_fraction_out_of_range_is_refused(fraction: float) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        stratified_fraction(np.arange(10) % 2, fraction, np.random.default_rng(0))


def test_labels_must_be_integers() -> None:
    with pytest.raises(DataError, match="integer"):
        stratified_fraction(np.array([0.0, 1.0]), 0.5, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# finetune


def _colour_data(n: int, seed: int, side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by their dominant colour channel, under uniform noise.

    Crops and flips keep the colour, so the classes stay separable after augmentation.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    noise = torch.randint(0, 120, (n, 3, side, side), generator=generator)
    noise[torch.arange(n), labels] += 135
    return noise.to(torch.uint8), labels


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(in_channels=3, width=4)


FAST = FinetuneSettings(epochs=5, batch_size=16, eval_every=2)


def _run(encoder: nn.Module, *, seed: int = 3, **overrides: Any) -> FinetuneResult:
    train_x, train_y = _colour_data(48, seed=1)
    test_x, test_y = _colour_data(60, seed=2)
    return finetune(
        encoder,
        feature_dim=16,
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        num_classes=3,
        settings=dataclasses.replace(FAST, **overrides),
        seed=seed,
    )


def test_finetuning_learns_a_separable_task() -> None:
    encoder = _encoder()
    result = _run(encoder)
    # Chance is 1/3; after five short epochs the colour classes are nearly all right.
    assert result.best_accuracy >= 0.9
    assert [epoch for epoch, _ in result.evaluations] == [2, 4, 5]
    assert result.best_accuracy == max(acc for _, acc in result.evaluations)
    assert result.best_accuracy >= result.last_accuracy == result.evaluations[-1][1]
    assert dict(result.evaluations)[result.best_epoch] == result.best_accuracy
    assert math.isfinite(result.train_loss)
    # The same encoder and head left untrained (both rates 0) stay at chance.
    untrained = _run(encoder, encoder_lr=0.0, head_lr=0.0)
    assert untrained.best_accuracy <= 0.5


def test_finetuning_is_deterministic_and_leaves_the_input_alone() -> None:
    encoder = _encoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    first = _run(encoder)
    second = _run(encoder)
    assert first == second  # accuracies, evaluations and loss
    assert torch.equal(first.head.weight, second.head.weight)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert encoder.training  # its mode is untouched too
    other = _run(encoder, seed=4)
    assert not torch.equal(first.head.weight, other.head.weight)


def test_each_part_trains_at_its_own_rate() -> None:
    encoder = _encoder()
    frozen_encoder = _run(encoder, encoder_lr=0.0)
    for name, param in frozen_encoder.encoder.named_parameters():
        assert torch.equal(param, dict(encoder.named_parameters())[name]), name
    frozen_head = _run(encoder, head_lr=0.0)
    # nn.Linear's default initialisation, drawn from the seed: uniform within 1/sqrt(16).
    assert frozen_head.head.weight.abs().max() <= 0.25
    again = _run(encoder, head_lr=0.0, encoder_lr=0.0)
    assert torch.equal(frozen_head.head.weight, again.head.weight)
    moved = [
        not torch.equal(param, dict(encoder.named_parameters())[name])
        for name, param in frozen_head.encoder.named_parameters()
    ]
    assert all(moved)


def test_bad_inputs_are_refused() -> None:
    images, labels = _colour_data(6, seed=0)
    common: dict[str, Any] = {
        "feature_dim": 16,
        "test_images": images,
        "test_labels": labels,
        "num_classes": 3,
    }
    with pytest.raises(DataError, match="uint8"):
        finetune(_encoder(), train_images=images.float(), train_labels=labels, **common)
    with pytest.raises(DataError, match="lie in"):
        finetune(_encoder(), train_images=images, train_labels=labels + 1, **common)
    with pytest.raises(DataError, match="square"):
        finetune(_encoder(), train_images=images[..., :6], train_labels=labels, **common)
    with pytest.raises(ConfigError, match="epochs"):
        FinetuneSettings(epochs=0)
