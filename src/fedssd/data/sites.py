"""Real sites: each client is one given dataset (``data.partition = "clients"``).

A site is a folder of images or a tar archive of one (:mod:`fedssd.data.folder`, labelled by
class subfolders or not, with or without ``train/`` and ``test/`` splits) or an ``.npz`` file
(labelled, or ``x_train`` alone). :func:`load_site` reads one site and nothing else, which is
what a Flower node calls with its own ``data-path``; :func:`load_sites` reads all of them for
the simulator and lays them end to end, so that client ``k``'s indices are
exactly its own images, in file order (the natural, unshuffled split).

Labels are each site's own: a folder site numbers its class subfolders in sorted order, an
``.npz`` site keeps its integers. They are only used to evaluate (kNN on a client's own held-out
images, the label histogram of ``partition.json``), never to train.

This module imports neither Pillow (until a folder is decoded) nor matplotlib nor flwr.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedssd.config import DataConfig
from fedssd.data.datasets import ImageDataset, load_dataset, load_npz
from fedssd.data.fetch import Log, _silent
from fedssd.data.folder import is_archive
from fedssd.errors import ConfigError, DataError

__all__ = ["load_site", "load_sites", "site_dataset", "site_paths"]


def load_site(
    path: str | Path,
    *,
    image_size: int = 32,
    rgb: bool = True,
    pad_to_32: bool = True,
    root: str | Path | None = None,
    log: Log | None = None,
) -> ImageDataset:
    """One site's own data: a folder of images (or a tar archive of one) or an ``.npz`` file,
    labelled or not.

    An ``.npz`` may hold ``x_train`` alone (unlabelled), ``x_train`` and ``y_train``, or all
    four arrays; its test split, like that of a folder with ``train/`` and ``test/``, is kept as
    the dataset's test set.

    Args:
        path: The site's folder, tar archive or ``.npz`` file.
        image_size: Side a folder's images are resized and centre-cropped to.
        rgb: 3 channels (grayscale repeated), else one grayscale channel for folders.
        pad_to_32: Zero-pad 28x28 ``.npz`` images to 32x32 (folders are already ``image_size``).
        root: The data root, where a read-only folder's decoded cache goes.
        log: Receives one line per decision.

    Returns:
        The site's images as the training set (label -1 where unlabelled).

    Raises:
        DataError: The path does not exist, or its data is unreadable.
    """
    say = log if log is not None else _silent
    place = Path(path).expanduser()
    if place.is_dir() or (place.is_file() and is_archive(place)):
        return load_dataset(
            "folder", path=place, root=root, image_size=image_size, rgb=rgb, log=say
        )
    if place.is_file():
        # A site's own file need not hold a test split.
        return load_npz(place, pad_to_32=pad_to_32, rgb=rgb, require_test=False)
    raise DataError(
        f"The client dataset {place} does not exist; give a folder of images or an .npz file."
    )


def site_dataset(data: DataConfig, path: str | Path, *, log: Log | None = None) -> ImageDataset:
    """:func:`load_site` with the format options of a run's ``[data]`` table."""
    return load_site(
        path,
        image_size=data.image_size,
        rgb=data.rgb,
        pad_to_32=data.pad_to_32,
        root=data.root,
        log=log,
    )


def site_paths(data: DataConfig) -> list[Path]:
    """The sites of a ``partition = "clients"`` run, in client-id order.

    ``data.clients`` when given, else every (non-hidden) subfolder of ``data.path`` in sorted
    order of their names.

    Raises:
        ConfigError: Neither is set.
        DataError: ``data.path`` is not a folder or has no subfolders.
    """
    if data.clients:
        return [Path(p).expanduser() for p in data.clients]
    if data.path is None:
        raise ConfigError(
            "data.partition = 'clients' needs data.clients (one folder or .npz per client) or "
            "data.path (a folder with one subfolder per client)."
        )
    folder = Path(data.path).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"data.path {folder} is not a folder; with data.partition = 'clients' and no "
            "data.clients it must hold one subfolder per client."
        )
    sites = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not sites:
        raise DataError(
            f"data.path {folder} has no subfolders; with data.partition = 'clients' and no "
            "data.clients each subfolder is one client."
        )
    return sites


def load_sites(
    data: DataConfig, *, num_clients: int, log: Log | None = None
) -> tuple[ImageDataset, list[np.ndarray]]:
    """Every site's data laid end to end, and each client's indices into it.

    Args:
        data: The ``[data]`` table of a ``partition = "clients"`` run.
        num_clients: ``federation.num_clients``, which must equal the number of sites.
        log: Receives one line per decision.

    Returns:
        The combined dataset (test sets of labelled ``.npz`` sites appended, unused by the
        federated evaluation) and one int64 index array per client.

    Raises:
        ConfigError: The number of sites differs from ``num_clients``.
        DataError: A site is missing or unreadable, or the sites' images differ in shape.
    """
    say = log if log is not None else _silent
    paths = site_paths(data)
    if len(paths) != num_clients:
        raise ConfigError(
            f"There are {len(paths)} client datasets but federation.num_clients is "
            f"{num_clients}; make them equal (one client per site)."
        )
    sites = [site_dataset(data, path, log=say) for path in paths]
    shape = tuple(sites[0].x_train.shape[1:])
    for k, site in enumerate(sites):
        own = tuple(site.x_train.shape[1:])
        if own != shape:
            raise DataError(
                f"Client {k} ({paths[k]}) has images of shape {own} but client 0 ({paths[0]}) "
                f"has {shape}; every client needs the same image size and channels (set "
                "data.image_size, data.pad_to_32 and data.rgb, or convert the .npz files)."
            )
        say(
            f"client {k}: {site.x_train.shape[0]} images from {paths[k]}"
            f"{'' if site.labelled else ' (unlabelled)'}"
        )
    sizes = [site.x_train.shape[0] for site in sites]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = [np.arange(starts[k], starts[k + 1], dtype=np.int64) for k in range(len(sites))]
    names = {site.class_names for site in sites if site.class_names}
    dataset = ImageDataset(
        name=data.name,
        x_train=torch.cat([site.x_train for site in sites]),
        y_train=torch.cat([site.y_train for site in sites]),
        x_test=torch.cat([site.x_test for site in sites]),
        y_test=torch.cat([site.y_test for site in sites]),
        num_classes=max(site.num_classes for site in sites),
        # Only when every labelled folder site names the same classes do the names apply to all.
        class_names=next(iter(names)) if len(names) == 1 else (),
    )
    return dataset, parts
