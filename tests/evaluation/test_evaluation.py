"""Tests of fedssd.evaluation: features, kNN monitor, linear probe and representation metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedssd.evaluation
from fedssd.data.augment import to_float
from fedssd.errors import ConfigError, DataError
from fedssd.evaluation import (
    LinearProbeResult,
    alignment_loss,
    cross_uniformity_loss,
    effective_rank,
    extract_features,
    knn_accuracy,
    knn_predict,
    linear_probe,
    representation_metrics,
    uniformity_loss,
)

# ---------------------------------------------------------------------------------------------
# features


class _TinySSL(nn.Module):
    """A model with the SSLModel interface whose output depends on BatchNorm's mode."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6))
        self.projector = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
        self.modes_seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.modes_seen.extend(m.training for m in self.modules())
        h = self.encoder(x)
        return h, self.projector(h)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 2, 2), generator=generator, dtype=torch.uint8)


def test_evaluation_has_no_own_image_scaling() -> None:
    # fedssd.data.augment.to_float is the one uint8 -> [0, 1] conversion.
    assert "images_to_float" not in fedssd.evaluation.__all__
    assert not hasattr(fedssd.evaluation, "images_to_float")


@pytest.mark.parametrize("training", [True, False])
def test_extract_features_uses_eval_mode_and_restores_mode(training: bool) -> None:
    torch.manual_seed(0)
    model = _TinySSL()
    # Non-trivial running statistics, so eval and train outputs differ.
    model.train()
    model(to_float(_images(32, seed=1)))
    model.train(training)
    model.projector[1].train(not training)
    modes_before = [m.training for m in model.modules()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.modes_seen.clear()

    images = _images(10)
    h, z = extract_features(model, images, batch_size=3)

    assert not any(model.modes_seen)
    assert [m.training for m in model.modules()] == modes_before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    model.eval()
    with torch.no_grad():
        h_ref, z_ref = model(images.float() / 255)
    assert h.dtype == z.dtype == torch.float32
    assert h.device.type == z.device.type == "cpu"
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(z, z_ref)


def test_extract_features_passes_fewer_large_images_at_once() -> None:
    """The batch size counts 32x32 images: 64x64 images go a quarter as many per pass."""
    seen: list[int] = []

    class Pooled(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append(x.shape[0])
            h = x.mean(dim=(2, 3))
            return h, 2 * h

    images = torch.randint(0, 256, (10, 3, 64, 64), dtype=torch.uint8)
    h, z = extract_features(Pooled(), images, batch_size=8)
    assert seen == [2, 2, 2, 2, 2]
    torch.testing.assert_close(h, images.float().div(255).mean(dim=(2, 3)))
    torch.testing.assert_close(z, 2 * h)
    seen.clear()
    extract_features(Pooled(), images[:, :, :32, :32], batch_size=8)
    extract_features(Pooled(), images[:, :, :3, :3], batch_size=8)
    extract_features(Pooled(), images[:3], batch_size=1)
    assert seen == [8, 2, 8, 2, 1, 1, 1]


def test_extract_features_restores_mode_after_error() -> None:
    model = _TinySSL().train()
    with pytest.raises(RuntimeError):
        extract_features(model, torch.zeros(2, 1, 1, 1, dtype=torch.uint8))
    assert all(m.training for m in model.modules())


def test_extract_features_rejects_float_images() -> None:
    with pytest.raises(DataError):
        extract_features(_TinySSL(), torch.zeros(2, 3, 2, 2))


# ---------------------------------------------------------------------------------------------
# kNN


def _knn_reference(
    bank: torch.Tensor,
    labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    num_classes: int,
    k: int,
    temperature: float,
) -> list[int]:
    """Per-query loop: sort cosine similarities, sum exp(sim / T) of the top k per class."""
    predictions = []
    for query in queries.double():
        sims = [float(query @ row / (query.norm() * row.norm())) for row in bank.double()]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        scores = [0.0] * num_classes
        for j in order:
            scores[int(labels[j])] += math.exp(sims[j] / temperature)
        predictions.append(max(range(num_classes), key=lambda c: (scores[c], -c)))
    return predictions


def _knn_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(60, 8, generator=generator) * 3
    labels = torch.randint(0, 4, (60,), generator=generator)
    queries = torch.randn(25, 8, generator=generator)
    return bank, labels, queries


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.1), (7, 0.1), (20, 0.5)])
def test_knn_matches_brute_force(k: int, temperature: float) -> None:
    bank, labels, queries = _knn_data()
    predicted = knn_predict(
        bank, labels, queries, num_classes=4, k=k, temperature=temperature, chunk_size=4
    )
    expected = _knn_reference(bank, labels, queries, num_classes=4, k=k, temperature=temperature)
    assert predicted.tolist() == expected


def test_knn_chunking_does_not_change_predictions() -> None:
    bank, labels, queries = _knn_data(seed=1)
    results = [
        knn_predict(bank, labels, queries, num_classes=4, k=9, chunk_size=size)
        for size in (1, 3, 7, 25, 1000)
    ]
    for result in results[1:]:
        assert torch.equal(result, results[0])


def test_knn_k_larger_than_bank_uses_whole_bank() -> None:
    bank, labels, queries = _knn_data(seed=2)
    whole = knn_predict(bank, labels, queries, num_classes=4, k=10_000)
    assert torch.equal(whole, knn_predict(bank, labels, queries, num_classes=4, k=60))
    assert whole.tolist() == _knn_reference(
        bank, labels, queries, num_classes=4, k=60, temperature=0.1
    )


def test_knn_accuracy_is_one_on_clustered_data() -> None:
    generator = torch.Generator().manual_seed(3)
    centres = torch.eye(5, 16) * 10
    bank_labels = torch.arange(5).repeat(40)
    query_labels = torch.arange(5).repeat(8)
    bank = centres[bank_labels] + torch.randn(200, 16, generator=generator)
    queries = centres[query_labels] + torch.randn(40, 16, generator=generator)
    accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=5, k=20)
    assert accuracy == 1.0
    # Shuffled query labels give the fraction of labels that still match.
    wrong = query_labels.roll(1)
    assert knn_accuracy(bank, bank_labels, queries, wrong, num_classes=5, k=20) == 0.0


def test_knn_rejects_bad_arguments() -> None:
    bank, labels, queries = _knn_data()
    with pytest.raises(ConfigError):
        knn_predict(bank, labels, queries, num_classes=4, k=0)
    with pytest.raises(ConfigError):
        knn_predict(bank, labels, queries, num_classes=4, temperature=0.0)
    with pytest.raises(DataError):
        knn_predict(bank, labels, queries, num_classes=3)
    with pytest.raises(DataError):
        knn_predict(bank, labels, queries[:, :5], num_classes=4)


# ---------------------------------------------------------------------------------------------
# linear probe


def _clusters(
    n: int, *, dim: int, classes: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.randint(0, classes, (n,), generator=generator)
    return centres[labels] + spread * torch.randn(n, dim, generator=generator), labels


def test_linear_probe_separates_gaussian_clusters() -> None:
    x_train, y_train = _clusters(2000, dim=16, classes=5, spread=1.0, seed=0)
    x_test, y_test = _clusters(500, dim=16, classes=5, spread=1.0, seed=1)
    messages: list[str] = []
    result = linear_probe(
        x_train, y_train, x_test, y_test, num_classes=5, epochs=10, log=messages.append
    )
    assert result.accuracy > 0.95
    assert result.train_accuracy > 0.95
    assert result.best_accuracy >= result.accuracy
    assert 1 <= result.best_epoch <= 10
    assert len(messages) == 10
    assert messages[-1].startswith("linear probe epoch 10/10")


def test_linear_probe_is_deterministic_for_a_seed() -> None:
    x_train, y_train = _clusters(600, dim=8, classes=4, spread=3.0, seed=0)
    x_test, y_test = _clusters(300, dim=8, classes=4, spread=3.0, seed=1)

    def run(seed: int) -> LinearProbeResult:
        return linear_probe(
            x_train, y_train, x_test, y_test, num_classes=4, epochs=3, batch_size=64, seed=seed
        )

    first, second, other = run(5), run(5), run(6)
    assert first == second
    assert torch.equal(first.weight, second.weight)
    assert torch.equal(first.bias, second.bias)
    assert not torch.equal(first.weight, other.weight)


def test_linear_probe_step_matches_autograd_and_torch_adam() -> None:
    """The hand-written step equals nn.Linear + cross_entropy + torch.optim.Adam.

    The reference draws the same initial weights and shuffles from the seeded generator as the
    implementation (uniform init of the flat weight-then-bias buffer, one randperm per epoch).
    The batch does not divide n, so the smaller last batch is covered too.
    """
    x_train, y_train = _clusters(250, dim=6, classes=3, spread=4.0, seed=2)
    x_test, y_test = _clusters(400, dim=6, classes=3, spread=4.0, seed=3)
    epochs, lr, batch, seed = 3, 0.05, 32, 11

    generator = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(6)
    flat = (torch.rand(3 * 7, generator=generator) * 2 - 1) * bound
    weight = flat[:18].view(3, 6).clone().requires_grad_()
    bias = flat[18:].clone().requires_grad_()
    optimiser = torch.optim.Adam([weight, bias], lr=lr, foreach=False)
    for _ in range(epochs):
        order = torch.randperm(250, generator=generator)
        for start in range(0, 250, batch):
            index = order[start : start + batch]
            loss = F.cross_entropy(F.linear(x_train[index], weight, bias), y_train[index])
            weight.grad, bias.grad = torch.autograd.grad(loss, [weight, bias])
            optimiser.step()
    with torch.no_grad():
        logits = F.linear(x_test, weight, bias)
        expected = (logits.argmax(1) == y_test).sum().item() / y_test.shape[0]
        margin = logits.topk(2, dim=1).values.diff(dim=1).abs().min().item()

    result = linear_probe(
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=3,
        epochs=epochs,
        lr=lr,
        batch_size=batch,
        seed=seed,
    )
    torch.testing.assert_close(result.weight, weight.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.bias, bias.detach(), rtol=1e-5, atol=1e-5)
    assert margin > 1e-4  # no test point sits on a decision boundary
    assert result.accuracy == expected


def test_linear_probe_rejects_out_of_range_labels() -> None:
    x, y = _clusters(20, dim=4, classes=3, spread=1.0, seed=0)
    with pytest.raises(DataError):
        linear_probe(x, y, x, y, num_classes=2, epochs=1)
    with pytest.raises(ConfigError):
        linear_probe(x, y, x, y, num_classes=3, epochs=0)


# ---------------------------------------------------------------------------------------------
# uniformity, alignment, effective rank


def _uniformity_reference(z: torch.Tensor, t: float) -> float:
    unit = F.normalize(z.double(), dim=1)
    return math.log(torch.exp(-t * torch.pdist(unit).pow(2)).mean().item())


def _cross_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    da, db = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    return math.log(torch.exp(-t * torch.cdist(da, db).pow(2)).mean().item())


def test_uniformity_of_identical_points_is_zero() -> None:
    z = torch.tensor([[0.3, -1.2, 2.0]]).repeat(50, 1)
    assert uniformity_loss(z) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("t", [0.5, 2.0, 200.0])
def test_uniformity_of_antipodal_points(t: float) -> None:
    z = torch.tensor([[2.0, 0.0], [-5.0, 0.0]])
    # ||z1 - z2||^2 = 4 on the unit circle; t = 200 underflows exp but not the log-space sum.
    assert uniformity_loss(z, t=t) == pytest.approx(-4 * t, rel=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 49, 50, 4096])
@pytest.mark.parametrize("t", [2.0, 5.0])
def test_uniformity_matches_pdist(chunk_size: int, t: float) -> None:
    z = torch.randn(50, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = _uniformity_reference(z, t)
    assert uniformity_loss(z, t=t, chunk_size=chunk_size) == pytest.approx(expected, abs=1e-10)
    assert uniformity_loss(z.float(), t=t, chunk_size=chunk_size) == pytest.approx(
        expected, abs=1e-5
    )


@pytest.mark.parametrize("chunk_size", [1, 6, 13, 1000])
def test_cross_uniformity_matches_cdist(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(31, 4, generator=generator, dtype=torch.float64)
    b = torch.randn(17, 4, generator=generator, dtype=torch.float64) + 1.0
    expected = _cross_reference(a, b, 2.0)
    assert cross_uniformity_loss(a, b, chunk_size=chunk_size) == pytest.approx(expected, abs=1e-10)
    assert cross_uniformity_loss(b, a, chunk_size=chunk_size) == pytest.approx(expected, abs=1e-10)


def test_uniformity_rejects_a_single_point() -> None:
    with pytest.raises(DataError):
        uniformity_loss(torch.ones(1, 3))


def test_alignment() -> None:
    generator = torch.Generator().manual_seed(2)
    z1 = torch.randn(20, 6, generator=generator)
    z2 = torch.randn(20, 6, generator=generator)
    assert alignment_loss(z1, 3 * z1) == pytest.approx(0.0, abs=1e-12)
    assert alignment_loss(z1, -z1) == pytest.approx(4.0, abs=1e-6)
    expected = (F.normalize(z1, dim=1) - F.normalize(z2, dim=1)).norm(dim=1).pow(2).mean()
    assert alignment_loss(z1, z2) == pytest.approx(float(expected), abs=1e-6)
    assert alignment_loss(z1, z2) == pytest.approx(alignment_loss(z2, z1), abs=1e-12)


def test_effective_rank_closed_forms() -> None:
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-12)
    # Equal singular values on a rotated, non-square matrix: rank d.
    q, _ = torch.linalg.qr(torch.randn(20, 5, generator=torch.Generator().manual_seed(3)))
    assert effective_rank(3.0 * q) == pytest.approx(5.0, rel=1e-9)
    rank_one = torch.outer(torch.arange(1.0, 11.0), torch.tensor([1.0, -2.0, 0.5]))
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-6)
    # Singular values (1, 1, 2): p = (1/4, 1/4, 1/2), entropy 1.5 log 2, rank 2^1.5.
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 2.0]))) == pytest.approx(
        2**1.5, rel=1e-9
    )
    assert effective_rank(torch.zeros(4, 3)) == 0.0


# ---------------------------------------------------------------------------------------------
# representation_metrics


def _client_features(
    *, separated: bool, per_client: int = 40, clients: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.arange(clients).repeat_interleave(per_client)
    centres = torch.eye(clients, 8) if separated else torch.eye(1, 8).expand(clients, 8)
    features = centres[ids] + 0.1 * torch.randn(ids.shape[0], 8, generator=generator)
    return features, ids


@pytest.mark.parametrize(
    ("t", "chunk_size", "dtype"),
    [(2.0, 2048, torch.float32), (2.0, 7, torch.float32), (1000.0, 3, torch.float64)],
)
def test_representation_metrics_equals_direct_values_when_nothing_is_dropped(
    t: float, chunk_size: int, dtype: torch.dtype
) -> None:
    """With every row sampled, each entry equals the direct (tiled log-sum-exp) computation.

    At t = 1000 the between-client exponents lie near -1200, where exp underflows even in
    float64 (so these features are float64: float32 rounding of the squared distances would be
    amplified 1000-fold); small chunks split the pair matrix into many row tiles.
    """
    features, ids = _client_features(separated=True, per_client=12, clients=3)
    features = features.to(dtype)
    ids = ids * 10 + 5  # arbitrary, sorted ids 5, 15, 25
    result = representation_metrics(
        features, ids, t=t, max_samples=1000, max_per_client=100, chunk_size=chunk_size
    )
    assert result["clients"] == [5, 15, 25]
    assert result["samples_global"] == 36
    assert result["samples_per_client"] == [12, 12, 12]
    assert result["uniformity_global"] == pytest.approx(-uniformity_loss(features, t=t), rel=1e-5)
    # Row order does not change singular values, so the permuted sample gives the same rank.
    assert result["effective_rank"] == pytest.approx(effective_rank(features), rel=1e-6)
    parts = [features[ids == c] for c in (5, 15, 25)]
    for k in range(3):
        assert result["uniformity_intra"][k] == pytest.approx(
            -uniformity_loss(parts[k], t=t), rel=1e-5
        )
        for m in range(3):
            expected = (
                -uniformity_loss(parts[k], t=t)
                if k == m
                else -cross_uniformity_loss(parts[k], parts[m], t=t)
            )
            assert result["uniformity_inter"][k][m] == pytest.approx(expected, rel=1e-5)
    off = [result["uniformity_inter"][k][m] for k in range(3) for m in range(3) if k != m]
    assert result["uniformity_inter_mean"] == pytest.approx(sum(off) / 6, rel=1e-12)
    assert result["uniformity_intra_mean"] == pytest.approx(
        sum(result["uniformity_intra"]) / 3, abs=1e-12
    )


def test_representation_metrics_effective_rank_uses_raw_features() -> None:
    """Effective rank as the SSD paper (Fang et al., ICCV 2025) computes it: from the singular
    values of the feature matrix itself, row norms included.

    Rows (100, 0) and (0, 1) have singular values 100 and 1; normalised rows would give the
    identity, whose effective rank is 2.
    """
    features = torch.tensor([[100.0, 0.0], [0.0, 1.0]])
    result = representation_metrics(features, torch.tensor([0, 1]))
    p = torch.tensor([100.0, 1.0], dtype=torch.float64) / 101
    expected = math.exp(float(-(p * p.log()).sum()))
    assert result["effective_rank"] == pytest.approx(expected, rel=1e-9)
    assert expected < 1.1
    # Uniformity still sees unit rows: two orthogonal unit vectors, squared distance 2.
    assert result["uniformity_global"] == pytest.approx(4.0, rel=1e-6)


def test_representation_metrics_is_bounded_symmetric_serialisable_and_seeded() -> None:
    features, ids = _client_features(separated=True, per_client=50, clients=4)
    result = representation_metrics(features, ids, max_samples=60, max_per_client=10, seed=3)
    assert json.loads(json.dumps(result)) == result
    assert result["samples_global"] == 60
    assert result["samples_per_client"] == [10, 10, 10, 10]
    matrix = result["uniformity_inter"]
    assert len(matrix) == 4 and all(len(row) == 4 for row in matrix)
    assert all(matrix[k][m] == matrix[m][k] for k in range(4) for m in range(4))
    assert [matrix[k][k] for k in range(4)] == result["uniformity_intra"]
    assert all(isinstance(v, float) for row in matrix for v in row)
    assert (
        representation_metrics(features, ids, max_samples=60, max_per_client=10, seed=3) == result
    )
    other = representation_metrics(features, ids, max_samples=60, max_per_client=10, seed=4)
    assert other["uniformity_global"] != result["uniformity_global"]
    # The overall bound also caps the per-client quota: 60 // 4 = 15 < 20.
    capped = representation_metrics(features, ids, max_samples=60, max_per_client=20)
    assert capped["samples_per_client"] == [15, 15, 15, 15]


def test_representation_metrics_single_row_client_gives_none() -> None:
    features, ids = _client_features(separated=True, per_client=5, clients=3)
    features, ids = features[:11], ids[:11]  # client 2 keeps one row
    result = representation_metrics(features, ids)
    assert result["uniformity_intra"][2] is None
    assert result["uniformity_inter"][2][2] is None
    assert result["uniformity_inter"][0][2] is not None
    assert result["uniformity_intra_mean"] == pytest.approx(
        (result["uniformity_intra"][0] + result["uniformity_intra"][1]) / 2
    )
    json.dumps(result)


def test_representation_metrics_with_no_room_per_client_gives_none() -> None:
    features, ids = _client_features(separated=True, per_client=5, clients=4)
    result = representation_metrics(features, ids, max_samples=3)  # 3 // 4 = 0 rows per client
    assert result["samples_global"] == 3
    assert result["samples_per_client"] == [0, 0, 0, 0]
    assert result["uniformity_inter"] == [[None] * 4] * 4
    assert result["uniformity_intra_mean"] is None
    assert result["uniformity_inter_mean"] is None
    assert isinstance(result["uniformity_global"], float)


def test_separated_clients_are_more_inter_uniform_than_piled_clients() -> None:
    separated = representation_metrics(*_client_features(separated=True))
    piled = representation_metrics(*_client_features(separated=False))
    # Orthogonal centres: squared distance about 2, -L_unif about 2t = 4; piled: close to 0.
    assert separated["uniformity_inter_mean"] > 3.0
    assert piled["uniformity_inter_mean"] < 0.5
    assert separated["uniformity_global"] > piled["uniformity_global"]
    assert separated["effective_rank"] > piled["effective_rank"]
