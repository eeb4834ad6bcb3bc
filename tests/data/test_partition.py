"""Client partitions: exact cover, determinism, skew, and split-file validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedssd.data.partition import (
    dirichlet,
    iid,
    label_histogram,
    load_split_file,
    make_partition,
    pathological,
    subset_indices,
)
from fedssd.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
# The SSD paper's own splits (CIFAR-10/100, K = 10 and 50, 50000 train indices).
SPLITS = REPO / "src" / "fedssd" / "configs" / "splits"


def assert_exact_cover(parts: list[np.ndarray], num_samples: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each part must be sorted without repeats"
    merged = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    np.testing.assert_array_equal(merged, np.arange(num_samples))


def balanced_labels(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def entropy_per_client(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    histogram = label_histogram(labels, parts, num_classes=num_classes).astype(float)
    shares = histogram / histogram.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(shares > 0, -shares * np.log(shares), 0.0)
    return float(terms.sum(axis=1).mean())


# ---------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    num_classes=st.integers(1, 12),
    clients=st.integers(1, 25),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_uses_every_index_exactly_once(
    n: int, num_classes: int, clients: int, alpha: float, seed: int
) -> None:
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)
    clients = min(clients, n)
    parts = dirichlet(
        labels, num_clients=clients, alpha=alpha, rng=np.random.default_rng(seed), min_size=0
    )
    assert len(parts) == clients
    assert_exact_cover(parts, n)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), clients=st.integers(1, 25), seed=st.integers(0, 2**32 - 1))
def test_iid_uses_every_index_once_with_balanced_sizes(n: int, clients: int, seed: int) -> None:
    labels = np.zeros(n, dtype=np.int64)
    clients = min(clients, n)
    parts = iid(labels, num_clients=clients, rng=np.random.default_rng(seed))
    assert_exact_cover(parts, n)
    sizes = [part.shape[0] for part in parts]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(
    num_classes=st.integers(1, 10),
    per_class=st.integers(1, 30),
    clients=st.integers(1, 30),
    classes_per_client=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_pathological_gives_exactly_c_classes_and_covers_all(
    num_classes: int, per_class: int, clients: int, classes_per_client: int, seed: int
) -> None:
    assume(classes_per_client <= num_classes)
    assume(clients * classes_per_client >= num_classes)
    holders_per_class = -(-clients * classes_per_client // num_classes)
    assume(holders_per_class <= per_class)
    labels = np.random.default_rng(seed).permutation(balanced_labels(num_classes, per_class))
    parts = pathological(
        labels,
        num_clients=clients,
        classes_per_client=classes_per_client,
        rng=np.random.default_rng(seed),
    )
    assert_exact_cover(parts, labels.shape[0])
    histogram = label_histogram(labels, parts, num_classes=num_classes)
    np.testing.assert_array_equal((histogram > 0).sum(axis=1), classes_per_client)


# ------------------------------------------------------------------- behaviour of schemes


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_make_partition_is_deterministic_per_seed(scheme: str) -> None:
    labels = balanced_labels(10, 100)

    def split(seed: int) -> list[np.ndarray]:
        return make_partition(labels, scheme=scheme, num_clients=10, seed=seed, alpha=0.5)

    first, again, other = split(3), split(3), split(4)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_label_skew_grows_as_alpha_falls() -> None:
    labels = balanced_labels(10, 500)
    entropy = {}
    for alpha in (0.05, 1.0, 100.0):
        values = [
            entropy_per_client(
                labels,
                make_partition(labels, scheme="dirichlet", num_clients=10, seed=s, alpha=alpha),
                10,
            )
            for s in range(3)
        ]
        entropy[alpha] = float(np.mean(values))
    assert entropy[0.05] < entropy[1.0] < entropy[100.0]
    # alpha = 100 is close to iid: nearly the full log(10) nats per client.
    assert entropy[100.0] > 0.95 * np.log(10)
    assert entropy[0.05] < 0.5 * np.log(10)


def test_dirichlet_respects_min_size_at_paper_scale() -> None:
    labels = balanced_labels(10, 5000)
    parts = make_partition(labels, scheme="dirichlet", num_clients=50, seed=17, alpha=0.1)
    assert min(part.shape[0] for part in parts) >= 10
    assert_exact_cover(parts, labels.shape[0])


def test_dirichlet_gives_up_with_advice() -> None:
    labels = balanced_labels(10, 10)
    with pytest.raises(DataError, match=r"lower federation.num_clients or raise data.alpha\.$"):
        dirichlet(
            labels,
            num_clients=10,
            alpha=0.01,
            rng=np.random.default_rng(0),
            min_size=10,
            max_tries=3,
        )


def test_pathological_spreads_each_class_evenly() -> None:
    labels = balanced_labels(10, 100)
    parts = make_partition(
        labels, scheme="pathological", num_clients=20, seed=0, classes_per_client=2
    )
    histogram = label_histogram(labels, parts, num_classes=10)
    # 20 clients x 2 classes = 40 places, so each class is shared by exactly 4 clients, 25 each.
    np.testing.assert_array_equal((histogram > 0).sum(axis=0), 4)
    assert set(histogram[histogram > 0].tolist()) == {25}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "dirichlet", "alpha": 0.0}, "must be > 0"),
        ({"scheme": "dirichlet", "alpha": -1.0}, "must be > 0"),
        ({"scheme": "iid", "num_clients": 0}, "at least 1"),
        ({"scheme": "iid", "num_clients": 31}, "only 30 samples"),
        ({"scheme": "pathological", "classes_per_client": 0}, "between 1 and"),
        ({"scheme": "pathological", "classes_per_client": 4}, "between 1 and"),
        ({"scheme": "pathological", "num_clients": 1, "classes_per_client": 2}, "cover all"),
        ({"scheme": "dirichlet", "num_clients": 4, "min_size": 8}, "need 32 samples"),
        ({"scheme": "file"}, "needs data.split_file"),
        ({"scheme": "shards"}, "Unknown data.partition"),
        ({"scheme": "iid", "seed": -1}, "must be >= 0"),
    ],
)
def test_user_errors_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    labels = balanced_labels(3, 10)
    arguments: dict[str, object] = {"num_clients": 3, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        make_partition(labels, **arguments)  # type: ignore[arg-type]


def test_label_histogram_matches_explicit_count() -> None:
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 7, size=400)
    parts = make_partition(labels, scheme="dirichlet", num_clients=6, seed=1, alpha=0.3)
    histogram = label_histogram(labels, parts, num_classes=9)
    assert histogram.shape == (6, 9)
    assert histogram.dtype == np.int64
    for client, part in enumerate(parts):
        for cls in range(9):
            assert histogram[client, cls] == sum(1 for i in part if labels[i] == cls)


# ------------------------------------------------------------------------------- subsets


def test_subset_keeps_class_proportions_exactly() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    chosen = subset_indices(labels, size=10, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [5, 3, 2])
    assert np.all(np.diff(chosen) > 0)


def test_subset_uses_largest_remainders() -> None:
    # Exact shares 1.5, 0.9, 0.6: floors 1, 0, 0; the two largest remainders get the rest.
    labels = np.repeat(np.arange(3), [5, 3, 2])
    chosen = subset_indices(labels, size=3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[chosen], minlength=3), [1, 1, 1])


def test_subset_is_random_but_reproducible() -> None:
    labels = balanced_labels(10, 100)
    a = subset_indices(labels, size=50, rng=np.random.default_rng(1))
    b = subset_indices(labels, size=50, rng=np.random.default_rng(1))
    c = subset_indices(labels, size=50, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(np.bincount(labels[a]), 5)


@pytest.mark.parametrize("size", [0, 101])
def test_subset_size_out_of_range(size: int) -> None:
    with pytest.raises(ConfigError, match="use 1 to 100"):
        subset_indices(balanced_labels(10, 10), size=size, rng=np.random.default_rng(0))


# --------------------------------------------------------------------------- split files


def write_json(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def test_split_file_round_trip(tmp_path: Path) -> None:
    path = write_json(tmp_path / "split.json", [[4, 0, 2], [1, 3], [5]])
    parts = load_split_file(path, num_samples=6, num_clients=3)
    assert [part.tolist() for part in parts] == [[0, 2, 4], [1, 3], [5]]
    assert all(part.dtype == np.int64 for part in parts)
    via_scheme = make_partition(
        np.zeros(6, dtype=np.int64), scheme="file", num_clients=3, seed=0, split_file=path
    )
    assert [part.tolist() for part in via_scheme] == [[0, 2, 4], [1, 3], [5]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"0": [0, 1]}, "list of lists"),
        ([[0, 1], 2], "list of lists"),
        ([[0, 1], [2, 2]], "more than one"),
        ([[0, 1], [1, 2]], "more than one"),
        ([[0, 1], [2, 3]], "outside 0..2"),
        ([[0, -1], [2]], "outside 0..2"),
        ([[0], [2]], "never uses index 1"),
        ([[0, 1.0], [2]], "not an integer"),
        ([[0, True], [2]], "not an integer"),
        ([[0, "1"], [2]], "not an integer"),
        ([[0, 1, 2], []], "has no samples"),
    ],
)
def test_split_file_validation(tmp_path: Path, content: object, message: str) -> None:
    path = write_json(tmp_path / "split.json", content)
    with pytest.raises(DataError, match=message):
        load_split_file(path, num_samples=3)


def test_split_file_client_count_and_unreadable(tmp_path: Path) -> None:
    path = write_json(tmp_path / "split.json", [[0], [1], [2]])
    with pytest.raises(DataError, match=r"has 3 clients but federation\.num_clients is 2"):
        load_split_file(path, num_samples=3, num_clients=2)
    broken = tmp_path / "broken.json"
    broken.write_text("[[0, 1], [2", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_split_file(broken, num_samples=3)
    with pytest.raises(DataError, match="Cannot read the split file"):
        load_split_file(tmp_path / "absent.json", num_samples=3)


def test_paper_split_files_load_and_cover_the_train_set() -> None:
    files = sorted(SPLITS.glob("cifar*_dir_client*_alpha0.1.json"))
    assert len(files) == 4
    for path in files:
        clients = int(path.name.split("client")[1].split("_")[0])
        parts = load_split_file(path, num_samples=50_000, num_clients=clients)
        assert len(parts) == clients
        assert_exact_cover(parts, 50_000)


@pytest.mark.parametrize("huge", [2**63, -(2**63) - 1, 10**30])
def test_split_file_index_beyond_int64_is_a_data_error(tmp_path: Path, huge: int) -> None:
    path = write_json(tmp_path / "split.json", [[0, huge], [1, 2]])
    with pytest.raises(DataError, match="64-bit") as caught:
        load_split_file(path, num_samples=3)
    message = str(caught.value)
    assert str(path) in message
    assert "Client 0" in message
    assert message.endswith(".")
    assert ". " not in message
