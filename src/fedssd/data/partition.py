"""Splitting a training set over clients: pure functions of the labels and an explicit rng.

Every scheme returns one sorted int64 array of training-set indices per client, and every index
appears in exactly one client. :func:`make_partition` is the entry point used by runs; it derives
its generator from the run seed, so a partition depends on nothing but ``(labels, scheme options,
seed)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedssd.errors import ConfigError, DataError
from fedssd.seeding import PARTITION, numpy_rng

__all__ = [
    "PARTITION_SCHEMES",
    "dirichlet",
    "dirichlet_released",
    "iid",
    "label_histogram",
    "load_split_file",
    "make_partition",
    "pathological",
    "subset_indices",
]

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological", "file")


def _as_labels(labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {array.dtype} {array.shape}")
    if array.size and array.min() < 0:
        raise ValueError("labels must be non-negative")
    return array


def _check_clients(num_clients: int, num_samples: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"federation.num_clients is {num_clients}; it must be at least 1.")
    if num_clients > num_samples:
        raise ConfigError(
            f"federation.num_clients is {num_clients} but the training set has only "
            f"{num_samples} samples; use at most {num_samples} clients."
        )


def _sorted_parts(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(part).astype(np.int64) for part in parts]


def _piece_sizes(cuts: np.ndarray, total: int) -> np.ndarray:
    """The sizes of the pieces ``np.split`` makes of ``total`` items at the sorted ``cuts``."""
    bounds = np.clip(np.concatenate(([0], cuts, [total])), 0, total)
    return np.diff(bounds).astype(np.int64)


def _assemble(
    owners: list[np.ndarray], shuffled: list[np.ndarray], num_clients: int
) -> list[np.ndarray]:
    """Each client's sorted part of a split that gives ``shuffled[c][i]`` to client
    ``owners[c][i]``: one sort for all clients instead of a concatenation per client, which took
    most of a second for 10,000 clients."""
    owner = np.concatenate(owners).astype(np.int64)
    index = np.concatenate(shuffled).astype(np.int64)
    ordered = index[np.lexsort((index, owner))]
    counts = np.bincount(owner, minlength=num_clients)
    return np.split(ordered, np.cumsum(counts)[:-1])


def _owners(sizes: np.ndarray) -> np.ndarray:
    """Client k owns the k-th piece of these ``sizes``."""
    return np.repeat(np.arange(sizes.shape[0]), sizes)


def iid(labels: np.ndarray, *, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A uniformly random split into ``num_clients`` parts whose sizes differ by at most one.

    Args:
        labels: Training labels ``(n,)``; only their number matters here.
        num_clients: Number of clients.
        rng: Source of randomness.

    Returns:
        One sorted int64 index array per client.
    """
    labels = _as_labels(labels)
    _check_clients(num_clients, labels.shape[0])
    return _sorted_parts(np.array_split(rng.permutation(labels.shape[0]), num_clients))


def dirichlet(
    labels: np.ndarray,
    *,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """The Dirichlet label-skew split (Hsu et al., 2019), as used by the SSD paper.

    For every class the shares of the clients are drawn from ``Dir(alpha, ..., alpha)`` and the
    class's shuffled indices are cut at those proportions. Small ``alpha`` gives each client few
    classes; large ``alpha`` approaches an iid split. The whole draw is repeated until every
    client holds at least ``min_size`` samples.

    Args:
        labels: Training labels ``(n,)``.
        num_clients: Number of clients.
        alpha: Dirichlet concentration (> 0).
        rng: Source of randomness.
        min_size: Smallest acceptable client (0 accepts empty clients).
        max_tries: Draws before giving up.

    Returns:
        One sorted int64 index array per client.

    Raises:
        ConfigError: ``alpha <= 0``, ``min_size < 0``, or more clients than can be filled.
        DataError: No draw met ``min_size`` within ``max_tries``.
    """
    labels = _as_labels(labels)
    _check_clients(num_clients, labels.shape[0])
    if not alpha > 0:
        raise ConfigError(f"data.alpha is {alpha}; the Dirichlet concentration must be > 0.")
    if min_size < 0:
        raise ConfigError(f"data.min_client_size is {min_size}; it must be >= 0.")
    if num_clients * min_size > labels.shape[0]:
        raise ConfigError(
            f"{num_clients} clients of at least {min_size} samples need {num_clients * min_size} "
            f"samples but there are {labels.shape[0]}; lower federation.num_clients or "
            "data.min_client_size."
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        sizes, shuffled = [], []
        for members in by_class:
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * members.shape[0]).astype(np.int64)
            sizes.append(_piece_sizes(cuts, members.shape[0]))
            shuffled.append(rng.permutation(members))
        if np.sum(sizes, axis=0).min() >= min_size:
            return _assemble([_owners(s) for s in sizes], shuffled, num_clients)
    raise DataError(
        f"No Dirichlet split with alpha={alpha} gave all {num_clients} clients at least "
        f"{min_size} samples in {max_tries} draws; lower federation.num_clients or raise "
        "data.alpha."
    )


def dirichlet_released(
    labels: np.ndarray, *, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """The Dirichlet label-skew split by the rule of the SSD authors' released splitter.

    For every class the shares are drawn from ``Dir(alpha, ..., alpha)``; each client gets the
    floor of its share times the class size, the samples left over go one each to the clients
    with the largest remainders (ties to the lower client id), and the class's shuffled indices
    are cut at those counts. There is no redraw: a client may end up small or empty.

    Args:
        labels: Training labels ``(n,)``.
        num_clients: Number of clients.
        alpha: Dirichlet concentration (> 0).
        rng: Source of randomness.

    Returns:
        One sorted int64 index array per client.

    Raises:
        ConfigError: ``alpha <= 0`` or more clients than samples.
    """
    labels = _as_labels(labels)
    _check_clients(num_clients, labels.shape[0])
    if not alpha > 0:
        raise ConfigError(f"data.alpha is {alpha}; the Dirichlet concentration must be > 0.")
    sizes, shuffled = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        exact = rng.dirichlet(np.full(num_clients, alpha)) * members.shape[0]
        counts = np.floor(exact).astype(np.int64)
        leftover = int(members.shape[0] - counts.sum())
        counts[np.argsort(counts - exact, kind="stable")[:leftover]] += 1
        sizes.append(_piece_sizes(np.cumsum(counts)[:-1], members.shape[0]))
        shuffled.append(rng.permutation(members))
    return _assemble([_owners(s) for s in sizes], shuffled, num_clients)


def pathological(
    labels: np.ndarray,
    *,
    num_clients: int,
    classes_per_client: int,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Each client holds samples of exactly ``classes_per_client`` classes (McMahan et al., 2017).

    Every class is given to ``floor`` or ``ceil`` of ``num_clients * classes_per_client /
    num_classes`` clients (which classes get the extra client is random), and its shuffled samples
    are shared evenly among them. Clients pick their classes in turn, each taking the classes with
    the most unfilled places, ties broken at random; this greedy choice always completes because
    the class quotas differ by at most one.

    Args:
        labels: Training labels ``(n,)``.
        num_clients: Number of clients.
        classes_per_client: Distinct classes per client.
        rng: Source of randomness.

    Returns:
        One sorted int64 index array per client.

    Raises:
        ConfigError: ``classes_per_client`` out of range, too few clients to cover every class,
            or a class with fewer samples than clients holding it.
    """
    labels = _as_labels(labels)
    _check_clients(num_clients, labels.shape[0])
    classes = np.unique(labels)
    num_classes = classes.shape[0]
    if not 1 <= classes_per_client <= num_classes:
        raise ConfigError(
            f"data.classes_per_client is {classes_per_client}; it must be between 1 and the "
            f"{num_classes} classes present."
        )
    slots = num_clients * classes_per_client
    if slots < num_classes:
        raise ConfigError(
            f"{num_clients} clients with {classes_per_client} classes each cannot cover all "
            f"{num_classes} classes; raise federation.num_clients or data.classes_per_client."
        )
    quota = np.full(num_classes, slots // num_classes)
    quota[rng.choice(num_classes, size=slots % num_classes, replace=False)] += 1
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    remaining = quota.copy()
    for client in range(num_clients):
        # Primary key: most places left; secondary: random, to break ties.
        order = np.lexsort((rng.random(size=(num_classes,)), -remaining))
        for class_position in order[:classes_per_client]:
            holders[class_position].append(client)
            remaining[class_position] -= 1
    owners, shuffled = [], []
    for class_position, clients in enumerate(holders):
        members = rng.permutation(np.flatnonzero(labels == classes[class_position]))
        if members.shape[0] < len(clients):
            raise ConfigError(
                f"Class {classes[class_position]} has {members.shape[0]} samples but would be "
                f"shared by {len(clients)} clients; lower federation.num_clients."
            )
        # np.array_split's sizes: the first n % len(clients) pieces one longer.
        even, longer = divmod(members.shape[0], len(clients))
        sizes = np.full(len(clients), even) + (np.arange(len(clients)) < longer)
        owners.append(np.repeat(np.asarray(clients, dtype=np.int64), sizes))
        shuffled.append(members)
    return _assemble(owners, shuffled, num_clients)


def load_split_file(
    path: str | Path, *, num_samples: int, num_clients: int | None = None
) -> list[np.ndarray]:
    """Read a client split saved as a JSON list of lists of training-set indices.

    Args:
        path: The JSON file (e.g. the SSD paper's ``cifar10_dir_client10_alpha0.1.json``).
        num_samples: Size of the training set the indices refer to.
        num_clients: If given, the number of lists the file must hold.

    Returns:
        One sorted int64 index array per client.

    Raises:
        DataError: Unreadable or not a list of lists of ints, an index out of range, used twice
            or never, an empty client, or the wrong number of clients.
    """
    path = Path(path).expanduser()
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DataError(
            f"Cannot read the split file {path} ({error.strerror}); check data.split_file."
        ) from error
    except ValueError as error:
        raise DataError(
            f"The split file {path} is not valid JSON ({error}); fix or regenerate it."
        ) from error
    if not isinstance(loaded, list) or not all(isinstance(part, list) for part in loaded):
        raise DataError(
            f"The split file {path} must hold a JSON list of lists of sample indices, one "
            "list per client."
        )
    if num_clients is not None and len(loaded) != num_clients:
        raise DataError(
            f"The split file {path} has {len(loaded)} clients but federation.num_clients is "
            f"{num_clients}; make them equal."
        )
    parts: list[np.ndarray] = []
    for client, part in enumerate(loaded):
        if not part:
            raise DataError(
                f"Client {client} in the split file {path} has no samples; every client needs "
                "at least one."
            )
        # bool is an int subclass in Python, but true/false in a split file is a mistake.
        if not all(type(index) is int for index in part):
            raise DataError(
                f"Client {client} in the split file {path} has an entry that is not an integer "
                "index."
            )
        try:
            parts.append(np.asarray(part, dtype=np.int64))
        except OverflowError as error:
            raise DataError(
                f"Client {client} in the split file {path} has an index beyond the 64-bit "
                f"integer range, far outside 0..{num_samples - 1} of the training set; it was "
                "made for another dataset."
            ) from error
    everything = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    outside = everything[(everything < 0) | (everything >= num_samples)]
    if outside.size:
        raise DataError(
            f"The split file {path} uses index {outside[0]}, outside 0..{num_samples - 1} of the "
            "training set; it was made for another dataset."
        )
    counts = np.bincount(everything, minlength=num_samples)
    if (counts > 1).any():
        raise DataError(
            f"The split file {path} gives index {np.flatnonzero(counts > 1)[0]} to more than one "
            "client (or twice to one); each index must appear exactly once."
        )
    if (counts == 0).any():
        raise DataError(
            f"The split file {path} never uses index {np.flatnonzero(counts == 0)[0]} "
            f"({int((counts == 0).sum())} unused); every training index must appear exactly once."
        )
    return _sorted_parts(parts)


def subset_indices(labels: np.ndarray, *, size: int, rng: np.random.Generator) -> np.ndarray:
    """A stratified random subset of ``size`` samples that keeps the class proportions.

    Class ``c`` with ``n_c`` of ``n`` samples gets ``size * n_c / n`` rounded by the largest
    remainder rule, so the quotas sum to ``size`` exactly (e.g. the labelled 1% of CIFAR-10 is 50
    images per class).

    Args:
        labels: Labels ``(n,)``.
        size: Number of samples to keep, ``1 <= size <= n``.
        rng: Source of randomness.

    Returns:
        Sorted int64 indices ``(size,)``.
    """
    labels = _as_labels(labels)
    total = labels.shape[0]
    if not 1 <= size <= total:
        raise ConfigError(f"A subset of {size} samples was asked from {total}; use 1 to {total}.")
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / total
    quota = np.floor(exact).astype(np.int64)
    # Largest remainders first; a stable sort keeps ties in class order, independent of rng.
    leftover = size - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=int(take), replace=False)
        for cls, take in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def make_partition(
    labels: np.ndarray,
    *,
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float = 0.1,
    classes_per_client: int = 2,
    split_file: str | Path | None = None,
    min_size: int = 10,
    dirichlet_rule: str = "redraw",
) -> list[np.ndarray]:
    """Split a training set over clients by the named scheme, reproducibly from ``seed``.

    Args:
        labels: Training labels ``(n,)``.
        scheme: One of :data:`PARTITION_SCHEMES`.
        num_clients: Number of clients.
        seed: Run seed; the generator is ``SeedSequence([seed, <partition stream>])``.
        alpha: Dirichlet concentration (``"dirichlet"``).
        classes_per_client: Classes per client (``"pathological"``).
        split_file: JSON split file (``"file"``).
        min_size: Smallest client (``"dirichlet"`` with the ``redraw`` rule).
        dirichlet_rule: ``redraw`` (:func:`dirichlet`) or ``released``
            (:func:`dirichlet_released`, which ignores ``min_size``).

    Returns:
        One sorted int64 index array per client.
    """
    if seed < 0:
        raise ConfigError(f"seed is {seed}; it must be >= 0.")
    rng = numpy_rng(seed, PARTITION)
    if scheme == "iid":
        return iid(labels, num_clients=num_clients, rng=rng)
    if scheme == "dirichlet" and dirichlet_rule == "released":
        return dirichlet_released(labels, num_clients=num_clients, alpha=alpha, rng=rng)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients=num_clients, alpha=alpha, rng=rng, min_size=min_size)
    if scheme == "pathological":
        return pathological(
            labels, num_clients=num_clients, classes_per_client=classes_per_client, rng=rng
        )
    if scheme == "file":
        if split_file is None:
            raise ConfigError(
                "data.partition = 'file' needs data.split_file (a JSON list of index lists)."
            )
        return load_split_file(
            split_file, num_samples=_as_labels(labels).shape[0], num_clients=num_clients
        )
    raise ConfigError(
        f"Unknown data.partition {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}."
    )


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], *, num_classes: int) -> np.ndarray:
    """Samples per class for every client.

    Args:
        labels: Labels ``(n,)`` in ``[0, num_classes)``.
        parts: One index array per client.
        num_classes: Number of classes.

    Returns:
        Counts ``(num_clients, num_classes)``, int64.
    """
    labels = _as_labels(labels)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"label {labels.max()} is not below num_classes={num_classes}")
    histogram = np.zeros((len(parts), num_classes), dtype=np.int64)
    for client, part in enumerate(parts):
        histogram[client] = np.bincount(labels[part], minlength=num_classes)
    return histogram
