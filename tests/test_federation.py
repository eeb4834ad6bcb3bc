"""FedAvg, sampling, seeding and local training."""

from __future__ import annotations

import pytest
import torch

from fedssd.aggregate import fedavg
from fedssd.data.augment import SSL_AUGMENT
from fedssd.federation.client import LocalSettings, count_batches, local_train
from fedssd.federation.sampling import clients_per_round, sample_clients
from fedssd.federation.simulator import Schedule, round_lr
from fedssd.methods import MethodContext, build_method
from fedssd.models import build_model
from fedssd.seeding import CLIENT, derive_seed, generator


def test_fedavg_is_the_weighted_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(8)}
    out = fedavg([a, b], [1.0, 3.0])
    torch.testing.assert_close(out["w"], (a["w"] + 3 * b["w"]) / 4)
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 7
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0]))  # inputs untouched


def test_fedavg_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        fedavg([{"w": torch.zeros(1)}], [0.0])
    with pytest.raises(ValueError):
        fedavg([], [])


def test_fedavg_averages_batchnorm_statistics() -> None:
    m1 = build_model(encoder="small_cnn", width=4, projector_hidden=8)
    m2 = build_model(encoder="small_cnn", width=4, projector_hidden=8)
    m2.encoder.apply(
        lambda mod: mod.running_mean.fill_(2.0) if isinstance(mod, torch.nn.BatchNorm2d) else None
    )
    out = fedavg([m1.state_dict(), m2.state_dict()], [1.0, 1.0])
    means = [v for k, v in out.items() if k.startswith("encoder") and k.endswith("running_mean")]
    assert means and all(torch.allclose(v, torch.ones_like(v)) for v in means)


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "expected"),
    [(256, 128, 1, 2), (257, 128, 1, 2), (258, 128, 2, 6), (1, 128, 3, 0), (100, 128, 1, 1)],
)
def test_batch_count_skips_single_sample_batches(
    n: int, batch: int, epochs: int, expected: int
) -> None:
    assert count_batches(n, batch_size=batch, epochs=epochs) == expected


def test_sampling_cross_silo_and_cross_device() -> None:
    assert sample_clients(num_clients=10, fraction=1.0, round_index=3, seed=0) == list(range(10))
    assert clients_per_round(num_clients=50, fraction=0.2) == 10
    a = sample_clients(num_clients=50, fraction=0.2, round_index=0, seed=17)
    assert len(a) == 10 and len(set(a)) == 10 and a == sorted(a)
    assert a == sample_clients(num_clients=50, fraction=0.2, round_index=0, seed=17)
    assert a != sample_clients(num_clients=50, fraction=0.2, round_index=1, seed=17)
    assert a != sample_clients(num_clients=50, fraction=0.2, round_index=0, seed=18)


def test_derived_seeds_are_distinct_and_stable() -> None:
    seeds = {derive_seed(17, CLIENT, r, k) for r in range(5) for k in range(10)}
    assert len(seeds) == 50
    assert derive_seed(17, CLIENT, 0, 0) == derive_seed(17, CLIENT, 0, 0)


def test_cosine_schedule() -> None:
    schedule = Schedule(num_clients=1, fraction=1, rounds=4, lr=0.1, lr_schedule="cosine", seed=0)
    assert round_lr(schedule, 0) == pytest.approx(0.1)
    assert round_lr(schedule, 2) == pytest.approx(0.05)
    constant = Schedule(num_clients=1, fraction=1, rounds=4, lr=0.1, lr_schedule="constant", seed=0)
    assert round_lr(constant, 3) == 0.1


def _local(seed: int, indices: torch.Tensor, images: torch.Tensor) -> tuple[dict, float, int]:
    torch.manual_seed(0)
    model = build_model(encoder="small_cnn", width=4, projector_hidden=16, projector_out=None)
    method = build_method(
        "ssd",
        {},
        MethodContext(
            num_clients=2, feature_dim=16, embed_dim=16, seed=0, device=torch.device("cpu")
        ),
    )
    settings = LocalSettings(
        epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4, augment=SSL_AUGMENT
    )
    result = local_train(
        model,
        method,
        images,
        indices,
        settings=settings,
        generator=generator(seed, CLIENT, 0, 1),
        client_id=1,
        position=0,
    )
    return model.state_dict(), result.loss, result.num_batches


def test_local_training_is_reproducible_and_counts_batches() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    indices = torch.arange(5, 38)  # 33 samples: batches of 16, 16 and a skipped 1
    s1, loss1, batches = _local(3, indices, images)
    s2, loss2, _ = _local(3, indices, images)
    _, loss3, _ = _local(4, indices, images)
    assert batches == count_batches(33, batch_size=16, epochs=2) == 4
    assert loss1 == loss2 and loss1 != loss3
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
