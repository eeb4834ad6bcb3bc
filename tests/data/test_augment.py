"""Tests for the batched augmentation against torchvision's documented semantics.

The references here are written plainly, one image (or one pixel) at a time: torchvision's
RandomResizedCrop sampler with Python's ``random``, ``F.interpolate`` on each crop, the colour
jitter operations applied one by one, and ``colorsys`` for the hue shift.
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedssd.data.augment import (
    BRIGHTNESS,
    CONTRAST,
    FINETUNE_AUGMENT,
    HUE,
    SATURATION,
    SSL_AUGMENT,
    AugmentConfig,
    adjust_hue,
    apply_params,
    augment,
    color_jitter,
    crop_resize_flip,
    grayscale,
    sample_crop_boxes,
    sample_params,
    to_float,
    two_views,
)
from fedssd.errors import ConfigError, DataError

PLAIN = AugmentConfig(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0
)
SAMPLES = 4000


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n: int, channels: int = 3, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, height, width), generator=generator(123)).to(
        torch.uint8
    )


def reference_box(
    rng: random.Random,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, one image at a time."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def reference_gray(image: torch.Tensor) -> torch.Tensor:
    if image.shape[0] == 1:
        return image
    return 0.299 * image[0:1] + 0.587 * image[1:2] + 0.114 * image[2:3]


def reference_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    out = image.clone()
    for row in range(image.shape[1]):
        for col in range(image.shape[2]):
            red, green, blue = image[:, row, col].tolist()
            hue, saturation, value = colorsys.rgb_to_hsv(red, green, blue)
            out[:, row, col] = torch.tensor(
                colorsys.hsv_to_rgb((hue + shift) % 1.0, saturation, value)
            )
    return out


def reference_jitter(image: torch.Tensor, factors: list[float], order: list[int]) -> torch.Tensor:
    """torchvision's ColorJitter on one image with given factors and order."""
    for op in order:
        factor = factors[op]
        if op == BRIGHTNESS:
            image = image * factor
        elif op == CONTRAST:
            image = factor * image + (1 - factor) * reference_gray(image).mean()
        elif op == SATURATION and image.shape[0] == 3:
            image = factor * image + (1 - factor) * reference_gray(image)
        elif op == HUE and image.shape[0] == 3:
            image = reference_hue(image, factor)
        image = image.clamp(0.0, 1.0)
    return image


def test_to_float_scales_uint8_to_unit_interval() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    out = to_float(images)
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_same_seed_gives_identical_output_and_other_seeds_differ() -> None:
    images = random_images(16)
    first = augment(images, SSL_AUGMENT, generator=generator(5))
    again = augment(images, SSL_AUGMENT, generator=generator(5))
    other = augment(images, SSL_AUGMENT, generator=generator(6))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    view1, view2 = two_views(images, SSL_AUGMENT, generator=generator(5))
    again1, again2 = two_views(images, SSL_AUGMENT, generator=generator(5))
    assert torch.equal(view1, again1)
    assert torch.equal(view2, again2)
    assert not torch.allclose(view1, view2)


def test_augment_is_sample_params_then_apply_params() -> None:
    images = random_images(8)
    params = sample_params(8, height=32, width=32, config=SSL_AUGMENT, generator=generator(9))
    expected = apply_params(images, params, SSL_AUGMENT)
    assert torch.equal(augment(images, SSL_AUGMENT, generator=generator(9)), expected)


@pytest.mark.parametrize(
    ("channels", "height", "width", "dtype"),
    [(3, 32, 32, torch.uint8), (3, 40, 48, torch.float32), (1, 28, 28, torch.uint8)],
)
def test_output_shape_dtype_and_range(
    channels: int, height: int, width: int, dtype: torch.dtype
) -> None:
    images = random_images(12, channels, height, width)
    images = images if dtype == torch.uint8 else to_float(images)
    view1, view2 = two_views(images, SSL_AUGMENT, generator=generator(0))
    for view in (view1, view2):
        assert view.shape == (12, channels, 32, 32)
        assert view.dtype == torch.float32
        assert view.min() >= 0.0
        assert view.max() <= 1.0


def test_full_crop_without_flip_or_colour_is_identity() -> None:
    images = torch.rand(6, 3, 32, 32, generator=generator(1))
    out = augment(images, PLAIN, generator=generator(2))
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0.0)


def test_flip_alone_is_an_exact_horizontal_flip() -> None:
    images = random_images(6)
    out = augment(images, replace(PLAIN, flip_p=1.0), generator=generator(2))
    torch.testing.assert_close(out, to_float(images).flip(3), atol=1e-6, rtol=0.0)


@pytest.mark.parametrize("channels, height, width", [(3, 40, 48), (3, 32, 32), (1, 28, 28)])
def test_crop_resize_flip_matches_interpolate_on_each_crop(
    channels: int, height: int, width: int
) -> None:
    # A 40x48 input resized to 32 makes some crops shrink and others grow, covering both the
    # antialiased and the plain bilinear regime of F.interpolate (per-image matrices); 32x32
    # (CIFAR) and 28x28 (Fashion-MNIST) inputs only grow, which runs through grid_sample.
    images = torch.rand(24, channels, height, width, generator=generator(3))
    boxes = sample_crop_boxes(
        24,
        height=height,
        width=width,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        generator=generator(4),
    )
    flip = torch.arange(24) % 2 == 0
    out = crop_resize_flip(images, boxes=boxes, flip=flip, size=32)
    for i, (top, left, box_h, box_w) in enumerate(boxes.tolist()):
        crop = images[i : i + 1, :, top : top + box_h, left : left + box_w]
        expected = F.interpolate(
            crop, size=(32, 32), mode="bilinear", align_corners=False, antialias=True
        )[0]
        if flip[i]:
            expected = expected.flip(2)
        torch.testing.assert_close(out[i], expected.clamp(0, 1), atol=1e-5, rtol=0.0)
    if height > 32:
        assert (boxes[:, 2] > 32).any()
    assert (boxes[:, 2] < 32).any()


def test_crop_boxes_follow_torchvision_sampler_in_distribution() -> None:
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(
        SAMPLES, height=32, width=32, scale=scale, ratio=ratio, generator=generator(7)
    ).double()
    rng = random.Random(7)
    reference = torch.tensor(
        [reference_box(rng, 32, 32, scale, ratio) for _ in range(SAMPLES)], dtype=torch.float64
    )
    for sample in (boxes, reference):
        top, left, height, width = sample.unbind(1)
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + height <= 32).all() and (left + width <= 32).all()
        # Rounding the side lengths can take the area a little under 8% of the image.
        area = height * width / 1024
        assert area.min() >= 0.06
        assert area.max() <= 1.0
    area, ref_area = (s[:, 2] * s[:, 3] / 1024 for s in (boxes, reference))
    assert abs(area.mean() - ref_area.mean()) < 0.02
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    torch.testing.assert_close(
        area.quantile(quantiles), ref_area.quantile(quantiles), atol=0.03, rtol=0.0
    )
    log_aspect, ref_log_aspect = ((s[:, 3] / s[:, 2]).log() for s in (boxes, reference))
    assert abs(log_aspect.mean() - ref_log_aspect.mean()) < 0.02
    assert log_aspect.abs().max() <= math.log(4 / 3) + 0.15
    # The offset is uniform over the valid positions: its mean relative position is 1/2.
    room = 32 - boxes[:, 2]
    assert abs((boxes[room > 0, 0] / room[room > 0]).mean() - 0.5) < 0.02


def test_crop_falls_back_to_a_central_crop_with_clamped_ratio() -> None:
    # Width / height >= 3 never fits a square image at 90% of its area.
    boxes = sample_crop_boxes(
        5, height=32, width=32, scale=(0.9, 1.0), ratio=(3.0, 4.0), generator=generator(0)
    )
    expected = torch.tensor([[10, 0, 11, 32]]).expand(5, 4)
    assert torch.equal(boxes, expected)


def test_sampled_decision_rates_and_factor_ranges() -> None:
    params = sample_params(
        SAMPLES, height=32, width=32, config=SSL_AUGMENT, generator=generator(11)
    )
    assert abs(params.flip.double().mean() - 0.5) < 0.03
    assert abs(params.jitter.double().mean() - 0.8) < 0.03
    assert abs(params.grayscale.double().mean() - 0.2) < 0.03
    for column in (BRIGHTNESS, CONTRAST, SATURATION):
        factor = params.factors[:, column]
        assert factor.min() >= 0.2 and factor.max() <= 1.8
        assert factor.min() < 0.22 and factor.max() > 1.78
        assert abs(factor.mean() - 1.0) < 0.03
    hue = params.factors[:, HUE]
    assert hue.min() >= -0.2 and hue.max() <= 0.2
    assert hue.min() < -0.19 and hue.max() > 0.19
    assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(SAMPLES, 4))
    slot_rates = F.one_hot(params.order, 4).double().mean(dim=0)
    torch.testing.assert_close(
        slot_rates, torch.full((4, 4), 0.25, dtype=torch.float64), atol=0.03, rtol=0.0
    )


def test_output_rates_match_the_probabilities() -> None:
    images = random_images(SAMPLES // 4)
    config = replace(PLAIN, flip_p=0.5, grayscale_p=0.2)
    out = augment(images, config, generator=generator(12))
    floats = to_float(images)
    gray = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    unflipped = torch.where(gray[:, None, None, None], grayscale(floats).expand_as(floats), floats)
    flipped = (out - unflipped.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert ((out - unflipped).abs().amax(dim=(1, 2, 3)) < 1e-5).logical_xor(flipped).all()
    assert abs(flipped.double().mean() - 0.5) < 0.05
    assert abs(gray.double().mean() - 0.2) < 0.05
    jittered = augment(images, replace(PLAIN, jitter_p=0.8), generator=generator(13))
    changed = (jittered - floats).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert abs(changed.double().mean() - 0.8) < 0.05


@pytest.mark.parametrize("channels", [3, 1])
def test_batched_jitter_with_forced_order_matches_per_image_reference(channels: int) -> None:
    permutations = torch.tensor(
        [[a, b, c, d] for a in range(4) for b in range(4) for c in range(4) for d in range(4)]
    )
    order = permutations[permutations.sort(dim=1).values.eq(torch.arange(4)).all(dim=1)]
    n = order.shape[0]
    images = torch.rand(n, channels, 6, 6, generator=generator(14))
    factors = torch.stack(
        [
            torch.empty(n).uniform_(0.2, 1.8, generator=generator(15)),
            torch.empty(n).uniform_(0.2, 1.8, generator=generator(16)),
            torch.empty(n).uniform_(0.2, 1.8, generator=generator(17)),
            torch.empty(n).uniform_(-0.2, 0.2, generator=generator(18)),
        ],
        dim=1,
    )
    active = torch.arange(n) % 5 != 0
    out = color_jitter(images, factors=factors, order=order, active=active)
    for i in range(n):
        expected = images[i]
        if active[i]:
            expected = reference_jitter(images[i], factors[i].tolist(), order[i].tolist())
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0.0)


def test_hue_shift_by_zero_is_identity() -> None:
    images = torch.rand(8, 3, 16, 16, generator=generator(19))
    torch.testing.assert_close(adjust_hue(images, torch.zeros(8)), images, atol=1e-6, rtol=0.0)


def test_hue_shift_matches_colorsys_per_pixel() -> None:
    pixels = [
        (0.5, 0.5, 0.5),
        (1.0, 0.0, 0.0),
        (1.0, 1.0, 0.0),
        (0.2, 0.8, 0.8),
        (0.9, 0.1, 0.9),
        (0.3, 0.6, 0.1),
        (0.05, 0.2, 0.7),
    ]
    shifts = [0.0, 0.1, -0.2, 0.5, 0.37]
    images = torch.tensor(pixels).T.reshape(1, 3, 1, len(pixels)).expand(len(shifts), -1, -1, -1)
    out = adjust_hue(images, torch.tensor(shifts))
    for i, shift in enumerate(shifts):
        for j, (red, green, blue) in enumerate(pixels):
            hue, saturation, value = colorsys.rgb_to_hsv(red, green, blue)
            expected = colorsys.hsv_to_rgb((hue + shift) % 1.0, saturation, value)
            assert out[i, :, 0, j].tolist() == pytest.approx(expected, abs=1e-6)


def test_grayscale_uses_luminance_and_keeps_single_channel_images() -> None:
    images = torch.eye(3).view(3, 3, 1, 1)
    assert grayscale(images).flatten().tolist() == pytest.approx([0.299, 0.587, 0.114])
    single = torch.rand(2, 1, 4, 4)
    assert grayscale(single) is single


def test_single_channel_images_ignore_saturation_hue_and_grayscale() -> None:
    images = random_images(6, channels=1)
    config = replace(
        PLAIN, brightness=0.0, contrast=0.0, saturation=0.8, hue=0.2, jitter_p=1.0, grayscale_p=1.0
    )
    out = augment(images, config, generator=generator(20))
    torch.testing.assert_close(out, to_float(images), atol=1e-6, rtol=0.0)


def test_finetune_augment_is_square_crops_and_flips_only() -> None:
    params = sample_params(
        500, height=32, width=32, config=FINETUNE_AUGMENT, generator=generator(0)
    )
    assert torch.equal(params.boxes[:, 2], params.boxes[:, 3])
    assert (params.boxes[:, 2] >= 26).all()
    images = random_images(8)
    params = sample_params(8, height=32, width=32, config=FINETUNE_AUGMENT, generator=generator(1))
    expected = crop_resize_flip(to_float(images), boxes=params.boxes, flip=params.flip, size=32)
    out = augment(images, FINETUNE_AUGMENT, generator=generator(1))
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "changes",
    [
        {"size": 0},
        {"crop_scale": (0.5, 0.2)},
        {"crop_scale": (0.0, 1.0)},
        {"crop_ratio": (2.0, 1.0)},
        {"flip_p": 1.5},
        {"jitter_p": -0.1},
        {"brightness": -1.0},
        {"hue": 0.6},
    ],
)
def test_invalid_config_raises_config_error(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        replace(SSL_AUGMENT, **changes)


def test_wrong_image_layout_raises_data_error() -> None:
    with pytest.raises(DataError, match="1 or 3 channels"):
        augment(torch.zeros(2, 2, 8, 8), SSL_AUGMENT, generator=generator(0))
    with pytest.raises(DataError):
        augment(torch.zeros(3, 8, 8), SSL_AUGMENT, generator=generator(0))
