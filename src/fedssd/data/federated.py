"""A dataset split over clients, and the views the evaluations look at.

:func:`prepare_data` loads the dataset a config names and splits its training set over the
clients (:class:`FederatedData`); :func:`node_data` is one deployed node's own site;
:func:`server_evaluation_views` and :func:`run_evaluation_views` give the labelled images the
kNN monitor and the final evaluation use (:class:`EvaluationViews`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedssd.config import Config, DataConfig
from fedssd.data.augment import SSL_AUGMENT, AugmentConfig
from fedssd.data.datasets import DATASET_NAMES, USER_DATASETS, ImageDataset, load_dataset
from fedssd.data.partition import make_partition, subset_indices
from fedssd.data.sites import load_sites, site_dataset
from fedssd.errors import ConfigError, DataError
from fedssd.seeding import EVALUATION, SUBSET, numpy_rng

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class EvaluationViews:
    """What the evaluations look at.

    Attributes:
        train_images: ``(n, c, height, width)`` uint8, every client's training images.
        train_labels: ``(n,)`` their labels.
        train_clients: ``(n,)`` the client holding each of them.
        test_images: ``(m, c, height, width)`` uint8 test images.
        test_labels: ``(m,)`` their labels.
        num_classes: Number of classes.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    train_clients: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """A dataset split over clients.

    Attributes:
        dataset: The whole dataset (uint8 images on the CPU).
        client_indices: One sorted int64 array of training-set indices per client.
        test_indices: Indices of the test images used for evaluation.
        scheme: The partition scheme that made the split (``data.partition``).
    """

    dataset: ImageDataset
    client_indices: list[np.ndarray]
    test_indices: np.ndarray
    scheme: str = "dirichlet"

    @property
    def federated_evaluation(self) -> bool:
        """Whether, without a server-side set, evaluation runs on each client's own images:
        for real sites (``partition = "clients"``) and for data without a labelled test set."""
        test = self.dataset.y_test
        return self.scheme == "clients" or not (test.numel() and bool((test >= 0).all()))

    def evaluation_views(self) -> EvaluationViews:
        """The clients' training images (in index order, with their owners) and the test set."""
        owner = np.full(self.dataset.y_train.shape[0], -1, dtype=np.int64)
        for k, part in enumerate(self.client_indices):
            owner[part] = k
        union = torch.from_numpy(np.flatnonzero(owner >= 0))
        test = torch.from_numpy(self.test_indices)
        return EvaluationViews(
            train_images=self.dataset.x_train[union],
            train_labels=self.dataset.y_train[union],
            train_clients=torch.from_numpy(owner)[union],
            test_images=self.dataset.x_test[test],
            test_labels=self.dataset.y_test[test],
            num_classes=self.dataset.num_classes,
        )

    def augmentation(self) -> AugmentConfig:
        """The paper's two-view augmentation, producing views of the images' own size."""
        height, width = self.dataset.x_train.shape[-2:]
        if height != width:
            raise DataError(
                f"{self.dataset.name} images are {height}x{width}; fedssd needs square images "
                "(crop or pad them before saving the dataset)."
            )
        return dataclasses.replace(SSL_AUGMENT, size=int(height))


def named_dataset(name: str) -> bool:
    """A built-in dataset's name (rather than a path) in ``evaluation.data``."""
    return name in DATASET_NAMES and name not in USER_DATASETS


def load_data(data: DataConfig, *, log: Log) -> ImageDataset:
    """Read the dataset ``data`` names, with its location, download and format options."""
    return load_dataset(
        data.name,
        path=data.path,
        root=data.root,
        download=data.download,
        pad_to_32=data.pad_to_32,
        rgb=data.rgb,
        image_size=data.image_size,
        resize=data.resize,
        log=log,
    )


def data_subsets(config: Config, dataset: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training pool and of the test images: the stratified subsets of
    ``data.train_subset`` and ``data.test_subset`` drawn from the run seed, or all images."""
    data = config.data
    labels = dataset.y_train.numpy()
    pool = np.arange(labels.shape[0])
    if 0 < data.train_subset < labels.shape[0]:
        rng = numpy_rng(config.seed, SUBSET, 0)
        if dataset.labelled and labels.min() >= 0:
            pool = subset_indices(labels, size=data.train_subset, rng=rng)
        else:
            # Nothing to stratify by: a uniform random subset.
            pool = np.sort(rng.choice(labels.shape[0], size=data.train_subset, replace=False))
    test_labels = dataset.y_test.numpy()
    test = np.arange(test_labels.shape[0])
    if 0 < data.test_subset < test_labels.shape[0]:
        test = subset_indices(
            test_labels, size=data.test_subset, rng=numpy_rng(config.seed, SUBSET, 1)
        )
    return pool, test


def prepare_data(config: Config, *, log: Log) -> FederatedData:
    """Load the dataset and split its training set over the clients (pure given the config)."""
    data = config.data
    if data.partition == "clients":
        dataset, client_indices = load_sites(
            data, num_clients=config.federation.num_clients, log=log
        )
        return FederatedData(
            dataset=dataset,
            client_indices=client_indices,
            test_indices=np.arange(dataset.x_test.shape[0]),
            scheme="clients",
        )
    dataset = load_data(data, log=log)
    pool, test_indices = data_subsets(config, dataset)
    labels = dataset.y_train.numpy()[pool]
    if labels.size and labels.min() < 0:
        if data.partition in ("dirichlet", "pathological"):
            raise ConfigError(
                f"data.partition = {data.partition!r} splits by label but {data.path} has "
                "unlabelled images; use partition = 'clients' or 'iid'."
            )
        # The other schemes only count the images.
        labels = np.zeros_like(labels)
    parts = make_partition(
        labels,
        scheme=data.partition,
        num_clients=config.federation.num_clients,
        seed=config.seed,
        alpha=data.alpha,
        classes_per_client=data.classes_per_client,
        split_file=data.split_file,
        min_size=data.min_client_size,
        dirichlet_rule=data.dirichlet_rule,
    )
    client_indices = [pool[p] for p in parts]
    return FederatedData(
        dataset=dataset,
        client_indices=client_indices,
        test_indices=test_indices,
        scheme=data.partition,
    )


def node_data(config: Config, client_id: int, path: str | Path, *, log: Log) -> FederatedData:
    """One node's own data as a :class:`FederatedData` (for a deployed ``partition = "clients"``
    node): its site read by :func:`~fedssd.data.sites.load_site` with the run's format options,
    all of it client ``client_id``'s; the other clients' index arrays are empty, since a node
    never reads, receives or derives another party's data.

    Raises:
        ConfigError: ``client_id`` is not in ``0..num_clients-1``.
        DataError: The site is missing or unreadable.
    """
    count = config.federation.num_clients
    if not 0 <= client_id < count:
        raise ConfigError(
            f"client id {client_id} is outside 0..{count - 1} (federation.num_clients = {count})."
        )
    dataset = site_dataset(config.data, path, log=log)
    empty = np.zeros(0, dtype=np.int64)
    parts = [empty] * count
    parts[client_id] = np.arange(dataset.x_train.shape[0], dtype=np.int64)
    return FederatedData(
        dataset=dataset,
        client_indices=parts,
        test_indices=np.arange(dataset.x_test.shape[0]),
        scheme=config.data.partition,
    )


#: Share of a server-side evaluation set used as the kNN bank and probe training set when it has
#: no test split of its own (the rest are the queries and probe test images).
SERVER_BANK_SHARE = 0.8


def server_evaluation_views(config: Config, *, log: Log) -> EvaluationViews | None:
    """The views of the labelled evaluation set the server owns (``evaluation.data``).

    Reads only that set, never a client's training data. An ``.npz`` with ``x_test``/``y_test``
    gives its two splits (bank/probe-train and queries/probe-test); an ``.npz`` of ``x_train`` and
    ``y_train`` alone, a folder with one subfolder per class, or a built-in dataset's name (whose
    official test split is used) is split into a :data:`SERVER_BANK_SHARE` bank and the rest, a
    stratified draw from the run seed. Images take the run's ``data`` format options
    (``image_size``, ``rgb``, ``pad_to_32``); labels are the set's own.

    Args:
        config: The resolved run configuration.
        log: Receives one line per decision.

    Returns:
        The views (every image as client 0), or None when ``evaluation.data`` is not set.

    Raises:
        ConfigError: ``evaluation.data`` names nothing usable.
        DataError: The set is unreadable, unlabelled or too small to split.
    """
    source = config.evaluation.data
    if source is None:
        return None
    data = config.data
    if named_dataset(source):
        named = load_dataset(
            source,
            root=data.root,
            download=data.download,
            pad_to_32=data.pad_to_32,
            rgb=data.rgb,
            resize=data.resize,
            log=log,
        )
        images, labels = named.x_test, named.y_test
        test_images, test_labels = images[:0], labels[:0]
        num_classes = named.num_classes
    else:
        place = Path(source)
        if not place.exists():
            raise DataError(
                f"evaluation.data {place} does not exist; give a labelled .npz file, a folder "
                "with one subfolder per class, or a dataset name."
            )
        owned = site_dataset(data, place, log=log)
        if not owned.labelled:
            raise DataError(
                f"evaluation.data {place} has no labels; the server's evaluation set needs them "
                "(y_train in the .npz, or one subfolder per class)."
            )
        images, labels = owned.x_train, owned.y_train
        test_images, test_labels = owned.x_test, owned.y_test
        num_classes = owned.num_classes
    if test_images.shape[0] == 0:
        count = int(images.shape[0])
        if count < 2:
            raise DataError(
                f"evaluation.data {source} has {count} image(s); it needs at least two, to "
                "split into a kNN bank and queries."
            )
        size = min(max(1, round(SERVER_BANK_SHARE * count)), count - 1)
        bank = subset_indices(
            labels.numpy(), size=size, rng=numpy_rng(config.seed, EVALUATION, SUBSET)
        )
        rest = np.setdiff1d(np.arange(count), bank)
        bank_t, rest_t = torch.from_numpy(bank), torch.from_numpy(rest)
        images, labels, test_images, test_labels = (
            images[bank_t],
            labels[bank_t],
            images[rest_t],
            labels[rest_t],
        )
    log(
        f"server evaluation set {source}: {images.shape[0]} bank and {test_images.shape[0]} "
        f"query images, {num_classes} classes"
    )
    return EvaluationViews(
        train_images=images,
        train_labels=labels,
        train_clients=torch.zeros(images.shape[0], dtype=torch.long),
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
    )


def run_evaluation_views(
    config: Config, data: FederatedData, *, log: Log
) -> EvaluationViews | None:
    """What a simulated run evaluates on: the server's set when ``evaluation.data`` is set,
    None for a federated evaluation (see :attr:`FederatedData.federated_evaluation`), else the
    pooled clients' images and the test set.

    Raises:
        DataError: The server's images differ in shape from the training images.
    """
    if config.evaluation.data is not None:
        views = server_evaluation_views(config, log=log)
        assert views is not None
        trained = tuple(data.dataset.x_train.shape[1:])
        if tuple(views.train_images.shape[1:]) != trained:
            raise DataError(
                f"evaluation.data {config.evaluation.data} has images of shape "
                f"{tuple(views.train_images.shape[1:])} but the clients train on {trained}; set "
                "data.image_size, data.rgb and data.pad_to_32 to match, or convert the set."
            )
        return views
    if data.federated_evaluation:
        return None
    return data.evaluation_views()
