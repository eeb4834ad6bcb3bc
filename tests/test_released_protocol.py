"""Switches that reproduce the SSD authors' released runs: sample order for position keying,
drop_last, dsr_dims, fp16 and the paper presets."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fedssd import config as config_module
from fedssd import presets
from fedssd.data.augment import SSL_AUGMENT
from fedssd.errors import ConfigError
from fedssd.federation.client import LocalSettings, local_train
from fedssd.federation.sampling import sample_clients, shuffled_order
from fedssd.federation.simulator import Schedule, run_rounds
from fedssd.methods import MethodContext, build_method
from fedssd.methods.ssd import draw_scaling_sets
from fedssd.models import build_model
from fedssd.runtime import autocast_dtype
from fedssd.seeding import CLIENT, SAMPLE_ORDER, generator
from helpers import method_context


def _context(dim: int, num_clients: int) -> MethodContext:
    return method_context(num_clients=num_clients, feature_dim=dim, embed_dim=dim)


# ---- sample order ---------------------------------------------------------------------------


@pytest.mark.parametrize(("num_clients", "fraction"), [(10, 1.0), (50, 0.2)])
def test_shuffled_sample_is_the_same_set_in_a_seeded_random_order(
    num_clients: int, fraction: float
) -> None:
    orders = []
    for round_index in range(6):
        plain = sample_clients(
            num_clients=num_clients, fraction=fraction, round_index=round_index, seed=17
        )
        mixed = sample_clients(
            num_clients=num_clients,
            fraction=fraction,
            round_index=round_index,
            seed=17,
            shuffle=True,
        )
        assert plain == sorted(plain) and sorted(mixed) == plain
        # An independent computation of the order: a permutation from the SAMPLE_ORDER stream.
        rng = np.random.default_rng(np.random.SeedSequence([17, SAMPLE_ORDER, round_index]))
        assert mixed == [plain[int(i)] for i in rng.permutation(len(plain))]
        assert mixed == sample_clients(
            num_clients=num_clients,
            fraction=fraction,
            round_index=round_index,
            seed=17,
            shuffle=True,
        )
        orders.append(mixed)
    assert any(order != sorted(order) for order in orders)
    # A fixed client's position changes from round to round.
    first = [order[0] for order in orders]
    assert len(set(first)) > 1


def test_position_keying_asks_for_a_random_order_and_client_id_keying_does_not() -> None:
    assert shuffled_order(build_method("ssd", {"dsr_keying": "position"}, _context(8, 4)))
    assert not shuffled_order(build_method("ssd", {}, _context(8, 4)))
    assert not shuffled_order(build_method("fedalignuniform", {}, _context(8, 4)))
    assert not shuffled_order(object())


def test_simulator_trains_the_shuffled_order_with_matching_positions() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    indices = [torch.arange(8 * k, 8 * k + 8) for k in range(5)]

    def new_model() -> torch.nn.Module:
        return build_model(encoder="small_cnn", width=2, projector_hidden=8, projector_out=None)

    method = build_method("ssd", {"dsr_keying": "position"}, _context(8, 5))
    seen: list[tuple[int, int, int]] = []

    def on_client(round_index: int, position: int, _count: int, result: Any) -> None:
        seen.append((round_index, position, result.client_id))

    schedule = Schedule(
        num_clients=5, fraction=1.0, rounds=3, lr=0.05, lr_schedule="constant", seed=3
    )
    history = run_rounds(
        global_model=new_model(),
        client_model=new_model(),
        method=method,
        images=images,
        client_indices=indices,
        schedule=schedule,
        settings=LocalSettings(
            epochs=1, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.0, augment=SSL_AUGMENT
        ),
        on_client=on_client,
    )
    expected = [
        sample_clients(num_clients=5, fraction=1.0, round_index=r, seed=3, shuffle=True)
        for r in range(3)
    ]
    assert [r["clients"] for r in history] == expected
    assert seen == [(r, p, k) for r in range(3) for p, k in enumerate(expected[r])]
    assert any(order != sorted(order) for order in expected)


# ---- drop_last ------------------------------------------------------------------------------


def _train(n: int, *, drop_last: bool, batch_size: int = 8) -> tuple[int, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    images = torch.randint(
        0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    model = build_model(encoder="small_cnn", width=2, projector_hidden=8, projector_out=None)
    method = build_method("fedalignuniform", {}, _context(8, 2))
    result = local_train(
        model,
        method,
        images,
        torch.arange(n),
        settings=LocalSettings(
            epochs=2,
            batch_size=batch_size,
            lr=0.05,
            momentum=0.9,
            weight_decay=0.0,
            augment=SSL_AUGMENT,
            drop_last=drop_last,
        ),
        generator=generator(0, CLIENT, 0, 0),
        client_id=0,
        position=0,
    )
    return result.num_batches, model.state_dict()


@pytest.mark.parametrize(
    ("n", "kept", "dropped"), [(21, 6, 4), (16, 4, 4), (9, 2, 2), (10, 4, 2), (17, 4, 4)]
)
def test_drop_last_counts_only_full_batches(n: int, kept: int, dropped: int) -> None:
    # Batch 8 over 2 epochs: ceil(n / 8) batches (minus a size-1 one) kept, floor(n / 8) dropped.
    assert _train(n, drop_last=False)[0] == kept
    assert _train(n, drop_last=True)[0] == dropped


def test_drop_last_changes_training_only_when_a_batch_is_partial() -> None:
    _, kept = _train(21, drop_last=False)
    _, dropped = _train(21, drop_last=True)
    assert any(not torch.equal(kept[k], dropped[k]) for k in kept)
    _, full_a = _train(16, drop_last=False)
    _, full_b = _train(16, drop_last=True)
    assert all(torch.equal(full_a[k], full_b[k]) for k in full_a)


def test_drop_last_client_smaller_than_a_batch_trains_nothing() -> None:
    steps, state = _train(5, drop_last=True)
    torch.manual_seed(0)
    fresh = build_model(encoder="small_cnn", width=2, projector_hidden=8, projector_out=None)
    assert steps == 0
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())


def test_drop_last_is_a_federation_key() -> None:
    assert config_module.load(None).federation.drop_last is False
    cfg = config_module.load(None, ["federation.drop_last=true"])
    assert cfg.federation.drop_last is True
    with pytest.raises(ConfigError):
        config_module.load(None, ["federation.drop_last=3"])


# ---- dsr_dims -------------------------------------------------------------------------------


def test_dsr_dims_overrides_floor_d_over_k() -> None:
    default = draw_scaling_sets(embed_dim=512, num_clients=10, seed=17)
    assert tuple(default.dims.shape) == (10, 51)
    narrow = draw_scaling_sets(embed_dim=512, num_clients=10, seed=17, dims_per_client=10)
    assert tuple(narrow.dims.shape) == (10, 10)
    assert len(set(narrow.dims.flatten().tolist())) == 100
    method = build_method("ssd", {"dsr_dims": 3}, _context(16, 4))
    assert method.sets is not None and tuple(method.sets.dims.shape) == (4, 3)
    scale = method._scales[0]
    assert int((scale == 10.0).sum()) == 3


def test_dsr_dims_must_fit_in_the_embedding() -> None:
    with pytest.raises(ConfigError, match="dsr_dims = 5"):
        build_method("ssd", {"dsr_dims": 5}, _context(16, 4))
    with pytest.raises(ConfigError, match="dsr_dims"):
        build_method("ssd", {"dsr_dims": -1}, _context(16, 4))
    build_method("ssd", {"dsr_dims": 4}, _context(16, 4))  # 4 * 4 = 16 fits exactly


# ---- precision ------------------------------------------------------------------------------


def test_fp16_is_refused_on_a_cpu_and_chosen_on_cuda() -> None:
    with pytest.raises(ConfigError, match="fp16"):
        autocast_dtype("fp16", torch.device("cpu"))
    assert autocast_dtype("fp16", torch.device("cuda")) is torch.float16
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert config_module.load(None, ["precision=fp16"]).precision == "fp16"


def test_only_fp16_builds_a_grad_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default path never touches GradScaler; float16 does (patched so it runs on a CPU)."""
    built: list[str] = []

    class Spy:
        def __init__(self, device: str) -> None:
            built.append(device)

        def scale(self, loss: torch.Tensor) -> torch.Tensor:
            return loss

        def step(self, optimizer: torch.optim.Optimizer) -> None:
            optimizer.step()

        def update(self) -> None:
            built.append("update")

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    _train(16, drop_last=False)
    assert built == []
    monkeypatch.setattr(torch, "float16", torch.bfloat16)  # CPU autocast has no float16
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    model = build_model(encoder="small_cnn", width=2, projector_hidden=8, projector_out=None)
    local_train(
        model,
        build_method("fedalignuniform", {}, _context(8, 2)),
        images,
        torch.arange(16),
        settings=LocalSettings(
            epochs=1,
            batch_size=8,
            lr=0.05,
            momentum=0.9,
            weight_decay=0.0,
            augment=SSL_AUGMENT,
            autocast_dtype=torch.bfloat16,
        ),
        generator=generator(0, CLIENT, 0, 0),
        client_id=0,
        position=0,
    )
    assert built == ["cpu", "update", "update"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_trains_two_steps_on_cuda() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, device=device)
    model = build_model(encoder="small_cnn", width=2, projector_hidden=8, projector_out=None)
    model.to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = local_train(
        model,
        build_method(
            "fedalignuniform",
            {},
            MethodContext(num_clients=2, feature_dim=8, embed_dim=8, seed=0, device=device),
        ),
        images,
        torch.arange(16, device=device),
        settings=LocalSettings(
            epochs=1,
            batch_size=8,
            lr=0.05,
            momentum=0.9,
            weight_decay=0.0,
            augment=SSL_AUGMENT,
            autocast_dtype=torch.float16,
        ),
        generator=generator(0, CLIENT, 0, 0, device=device),
        client_id=0,
        position=0,
    )
    assert result.num_batches == 2 and result.finite
    assert all(
        torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()
    )
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- presets --------------------------------------------------------------------------------

PRESETS = [
    ("paper/cifar10-silo-ssd", "cifar10_dir_client10_alpha0.1.json", True),
    ("paper/cifar10-device-ssd", "cifar10_dir_client50_alpha0.1.json", False),
    ("paper/cifar100-silo-ssd", "cifar100_dir_client10_alpha0.1.json", True),
    ("paper/cifar100-device-ssd", "cifar100_dir_client50_alpha0.1.json", False),
]


@pytest.mark.parametrize(("name", "split", "drop_last"), PRESETS)
def test_paper_presets_use_the_released_protocol(name: str, split: str, drop_last: bool) -> None:
    cfg = config_module.load(presets.config_path(name))
    assert cfg.data.partition == "file"
    assert cfg.data.split_file == f"splits/{split}"
    assert (presets.ROOT / "splits" / split).is_file()
    assert cfg.federation.drop_last is drop_last
    assert cfg.validation.max_norm_ratio == 0
    assert cfg.federation.drop_last is (cfg.federation.num_clients <= 10)


def test_paper_grids_keep_the_last_batch_for_k_50() -> None:
    for grid in ("paper-main",):
        text = presets.grid_path(grid).read_text()
        for block in text.split("[[settings]]")[1:]:
            if "num_clients=50" in block:
                assert "federation.drop_last=false" in block


# ---- Dirichlet rule -------------------------------------------------------------------------


def _released_by_hand(
    labels: list[int], num_clients: int, alpha: float, seed: int
) -> list[set[int]]:
    """The released rule written out with plain Python loops on the same random stream."""
    rng = np.random.default_rng(seed)
    clients: list[set[int]] = [set() for _ in range(num_clients)]
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        shares = rng.dirichlet([alpha] * num_clients)
        exact = [float(s) * len(members) for s in shares]
        counts = [int(x // 1) for x in exact]
        by_remainder = sorted(range(num_clients), key=lambda k: (-(exact[k] - counts[k]), k))
        for k in by_remainder[: len(members) - sum(counts)]:
            counts[k] += 1
        shuffled = [members[int(i)] for i in rng.permutation(len(members))]
        start = 0
        for k in range(num_clients):
            clients[k].update(shuffled[start : start + counts[k]])
            start += counts[k]
    return clients


@pytest.mark.parametrize(("alpha", "seed"), [(0.1, 0), (0.5, 3), (5.0, 9)])
def test_released_dirichlet_rule_matches_a_hand_computation(alpha: float, seed: int) -> None:
    from fedssd.data.partition import dirichlet_released

    labels = [i % 4 for i in range(103)]
    parts = dirichlet_released(
        np.array(labels), num_clients=5, alpha=alpha, rng=np.random.default_rng(seed)
    )
    expected = _released_by_hand(labels, 5, alpha, seed)
    assert [set(p.tolist()) for p in parts] == expected
    assert sorted(i for p in parts for i in p.tolist()) == list(range(103))


def test_dirichlet_rule_switch_changes_the_split_and_defaults_to_redraw() -> None:
    from fedssd.data.partition import make_partition

    labels = np.arange(600) % 10
    kwargs: dict[str, Any] = {"scheme": "dirichlet", "num_clients": 10, "seed": 17, "alpha": 0.1}
    redraw = make_partition(labels, **kwargs)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            redraw, make_partition(labels, **kwargs, dirichlet_rule="redraw"), strict=True
        )
    )
    released = make_partition(labels, **kwargs, dirichlet_rule="released")
    assert any(not np.array_equal(a, b) for a, b in zip(redraw, released, strict=True))
    assert config_module.load(None).data.dirichlet_rule == "redraw"
    assert (
        config_module.load(None, ["data.dirichlet_rule=released"]).data.dirichlet_rule == "released"
    )
    with pytest.raises(ConfigError):
        config_module.load(None, ["data.dirichlet_rule=other"])
