"""Dataset readers and the order in which a local copy is looked for.

Every dataset becomes an :class:`ImageDataset` of uint8 image tensors ``(n, channels, height,
width)`` and int64 labels, ready to be moved to the device whole: the dataset then stays there as
one tensor, a client is an index tensor and a batch is a gather from it. :func:`load_dataset`
looks for a copy in this order:

1. ``path`` (``data.path``): a file or folder holding a local copy; if given, it must hold one.
2. ``<root>/<name>/`` where root is ``root``, else ``$FEDSSD_DATA``, else ``~/.cache/fedssd``.
3. For Fashion-MNIST only, Debian's ``/usr/share/datasets/fashion-mnist/``
   (``apt-get install dataset-fashion-mnist``).
4. If ``download``, the official source, into ``<root>/<name>/``, checked before use.

Local copies are checked against the official digests in :mod:`fedssd.data.fetch` (once; the
result is remembered in ``<root>/verified.json``). Forms for which no digest is published, namely
un-gzipped MNIST files and an extracted Tiny-ImageNet folder, are used with a log line saying so.
Tiny-ImageNet is decoded once and reduced 64 -> 32 with the filter ``resize`` names
(:data:`RESIZE_FILTERS`: ``"box"``, Pillow's BOX filter, the default; ``"bilinear-antialias"``, the
antialiased bilinear resize of torchvision's tensor ``Resize`` used by the SSD authors' code, see
:func:`resize_bilinear_antialias`); the uint8 arrays are cached next to the zip or folder in
``tiny-imagenet-200-32x32-<filter>.npz``, one file per filter.
"""

from __future__ import annotations

import gzip
import importlib
import io
import math
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import numpy as np
import torch

from fedssd.data.fetch import (
    _GZIP_MAGIC,
    CHECKSUMS,
    RECORD_NAME,
    DatasetSources,
    Log,
    _silent,
    default_root,
    fetch_sources,
    missing_advice,
    temporary_sibling,
    verify_file,
)
from fedssd.data.folder import is_archive, read_image_folder
from fedssd.errors import ConfigError, DataError

__all__ = [
    "DATASET_NAMES",
    "RESIZE_FILTERS",
    "USER_DATASETS",
    "ImageDataset",
    "fetch_dataset",
    "load_dataset",
    "load_npz",
    "locate_dataset",
    "resize_bilinear_antialias",
]

DATASET_NAMES: tuple[str, ...] = (
    "fashion_mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "tiny_imagenet",
    "npz",
    "folder",
)
# The user's own data (a path, nothing to download).
USER_DATASETS = frozenset({"npz", "folder"})
# How Tiny-ImageNet's 64x64 images are reduced to 32x32 (``data.resize``).
RESIZE_FILTERS: tuple[str, ...] = ("box", "bilinear-antialias")

_NUM_CLASSES: Mapping[str, int] = MappingProxyType(
    {"fashion_mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "tiny_imagenet": 200}
)
_IDX_DATASETS = frozenset({"fashion_mnist", "mnist"})
_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Which pickles hold the train and test sets, and under which key the labels are (CIFAR-100 also
# has coarse labels; the paper uses the 100 fine classes).
_CIFAR_LAYOUT: Mapping[str, tuple[tuple[str, ...], tuple[str, ...], str]] = MappingProxyType(
    {
        "cifar10": (
            ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
            ("test_batch",),
            "labels",
        ),
        "cifar100": (("train",), ("test",), "fine_labels"),
    }
)
_IDX_UBYTE = 0x08
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# An .npz is a zip archive: a local file header first, or only the end record when it is empty.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_TINY_SIZE = 32
_TINY_PROGRESS_EVERY = 10_000

_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ImageDataset:
    """An image dataset held in memory, labelled or not.

    Unlabelled images (an image folder without class subfolders, an ``.npz`` of ``x_train``
    alone) have the label -1; a dataset with no labelled image has ``num_classes = 0``. Datasets
    of the user's own files may have an empty test set ``(0, channels, height, width)``.

    Attributes:
        name: The dataset name (one of :data:`DATASET_NAMES`).
        x_train: Training images ``(n, channels, height, width)``, uint8, contiguous.
        y_train: Training labels ``(n,)``, int64 in ``[0, num_classes)``, or -1 for unlabelled.
        x_test: Test images ``(m, channels, height, width)``, uint8, contiguous.
        y_test: Test labels ``(m,)``, int64.
        num_classes: Number of classes (0 when nothing is labelled).
        class_names: The class names, in label order, when the data names them (a folder).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...] = ()

    @property
    def labelled(self) -> bool:
        """Whether any training image has a label."""
        return self.num_classes > 0


def load_dataset(
    name: str,
    *,
    path: str | Path | None = None,
    root: str | Path | None = None,
    download: bool = True,
    pad_to_32: bool = True,
    rgb: bool = True,
    image_size: int = 32,
    resize: str = "box",
    log: Log | None = None,
    table: Mapping[str, DatasetSources] = CHECKSUMS,
) -> ImageDataset:
    """Find (or download) a dataset, read it and bring it to a common image format.

    Args:
        name: One of :data:`DATASET_NAMES`.
        path: A file or folder holding a local copy (required for ``"npz"``: the .npz file, and
            for ``"folder"``: the image folder or a tar archive of it, see
            :mod:`fedssd.data.folder`).
        root: The data root (default :func:`default_root`).
        download: Whether to fetch the official files when no local copy is found.
        pad_to_32: Zero-pad 28x28 images by 2 pixels on each side to 32x32 (not for folders).
        rgb: Repeat single-channel images to 3 channels (a folder: else read them as one).
        image_size: Side a folder's images are resized and centre-cropped to.
        resize: The filter Tiny-ImageNet is reduced 64 -> 32 with, one of
            :data:`RESIZE_FILTERS` (other datasets are not resized by it).
        log: Receives one line per decision or progress step.
        table: Official sources and digests (tests pass their own).

    Returns:
        The dataset, images ``(n, channels, height, width)`` uint8.

    Raises:
        ConfigError: Unknown name or filter, or ``"npz"`` without ``path``.
        DataError: No usable copy and none could be downloaded, or a file is corrupt.
    """
    _check_name(name)
    if resize not in RESIZE_FILTERS:
        options = ", ".join(repr(f) for f in RESIZE_FILTERS)
        raise ConfigError(f"data.resize must be one of {options}, not {resize!r}.")
    say = log if log is not None else _silent
    if name == "folder":
        if path is None:
            raise ConfigError(
                "Dataset 'folder' needs data.path set to your folder of PNG or JPEG images (or "
                "a tar archive of it)."
            )
        return _folder_dataset(
            Path(path).expanduser(), image_size=image_size, rgb=rgb, root=root, log=say
        )
    if name == "npz":
        if path is None:
            raise ConfigError(
                "Dataset 'npz' needs data.path set to your .npz file with the arrays "
                "x_train, y_train, x_test and y_test (or x_train alone)."
            )
        return load_npz(path, pad_to_32=pad_to_32, rgb=rgb)
    else:
        entry = _entry(name, table)
        location = _locate_or_fetch(
            name, entry, path=path, root=_root(root), download=download, table=table, log=say
        )
        arrays = _read(name, location, resize=resize, log=say)
        num_classes = _NUM_CLASSES[name]
        for labels, where in ((arrays[1], "training"), (arrays[3], "test")):
            if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
                raise DataError(
                    f"The {where} labels in {location} fall outside 0..{num_classes - 1}, so "
                    f"this is not {entry.title}; replace it with the official files."
                )
    x_train, y_train, x_test, y_test = arrays
    return ImageDataset(
        name=name,
        x_train=_to_images(x_train, pad_to_32=pad_to_32, rgb=rgb),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=_to_images(x_test, pad_to_32=pad_to_32, rgb=rgb),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=num_classes,
    )


def load_npz(
    path: str | Path, *, pad_to_32: bool = True, rgb: bool = True, require_test: bool = True
) -> ImageDataset:
    """A user's ``.npz``: ``x_train``, ``y_train``, ``x_test``, ``y_test``, or ``x_train`` alone
    (unlabelled: labels -1, empty test set).

    Args:
        path: The file.
        pad_to_32: Zero-pad 28x28 images to 32x32.
        rgb: Repeat single-channel images to 3 channels.
        require_test: Refuse a labelled file without ``x_test``/``y_test`` (``data.name = "npz"``
            needs them); when false such a file gets an empty test set (a client's own data, a
            server's evaluation set).

    Raises:
        DataError: The file is missing, unreadable or malformed.
    """
    arrays = _read_npz(Path(path).expanduser(), require_test=require_test)
    x_train, y_train, x_test, y_test = arrays
    if y_train.size and y_train.min() < 0:
        num_classes = 0
    else:
        num_classes = int(max(y_train.max(), y_test.max() if y_test.size else 0)) + 1
    return ImageDataset(
        name="npz",
        x_train=_to_images(x_train, pad_to_32=pad_to_32, rgb=rgb),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=_to_images(x_test, pad_to_32=pad_to_32, rgb=rgb),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=num_classes,
    )


def _folder_dataset(
    path: Path, *, image_size: int, rgb: bool, root: str | Path | None, log: Log
) -> ImageDataset:
    read = read_image_folder(path, image_size=image_size, rgb=rgb, cache_root=root, log=log)
    # The training copy must be writable memory; the cache itself stays mapped read-only.
    images = torch.from_numpy(np.require(read.images, dtype=np.uint8, requirements=["C", "W"]))
    labels = torch.from_numpy(np.array(read.labels, dtype=np.int64))
    # A folder with train/ and test/ lists its test split last.
    cut = images.shape[0] - read.num_test
    return ImageDataset(
        name="folder",
        x_train=images[:cut],
        y_train=labels[:cut],
        x_test=images[cut:] if read.num_test else images[:0].clone(),
        y_test=labels[cut:],
        num_classes=len(read.class_names),
        class_names=read.class_names,
    )


def locate_dataset(
    name: str,
    *,
    path: str | Path | None = None,
    root: str | Path | None = None,
    log: Log | None = None,
    table: Mapping[str, DatasetSources] = CHECKSUMS,
) -> Path | None:
    """Where a verified local copy of a dataset is, without downloading anything.

    Args:
        name: One of :data:`DATASET_NAMES`.
        path: If given, only this file or folder is considered.
        root: The data root (default :func:`default_root`).
        log: Receives one line per decision.
        table: Official sources and digests.

    Returns:
        The folder holding the IDX files, the archive, or the extracted folder; for ``"npz"`` the
        file itself; ``None`` if there is no usable copy.
    """
    _check_name(name)
    say = log if log is not None else _silent
    if name == "npz":
        candidate = Path(path).expanduser() if path is not None else None
        return candidate if candidate is not None and candidate.is_file() else None
    if name == "folder":
        candidate = Path(path).expanduser() if path is not None else None
        if candidate is None:
            return None
        return (
            candidate
            if candidate.is_dir() or (is_archive(candidate) and candidate.is_file())
            else None
        )
    entry = _entry(name, table)
    base = _root(root)
    places = [Path(path).expanduser()] if path is not None else _default_places(name, entry, base)
    found, _ = _search(name, entry, places, record=base / RECORD_NAME, log=say)
    return found


def fetch_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    log: Log | None = None,
    table: Mapping[str, DatasetSources] = CHECKSUMS,
) -> Path:
    """Download a dataset's official files into ``<root>/<name>/``, verifying each before use.

    Files already there and verified are kept.

    Args:
        name: A dataset with official sources (not ``"npz"``).
        root: The data root (default :func:`default_root`).
        log: Receives progress lines.
        table: Official sources and digests.

    Returns:
        The location :func:`load_dataset` reads: the folder for IDX datasets, else the archive.

    Raises:
        DataError: A download failed or had the wrong digest.
    """
    _check_name(name)
    if name in USER_DATASETS:
        raise ConfigError(f"Dataset {name!r} is your own data, so there is nothing to download.")
    say = log if log is not None else _silent
    entry = _entry(name, table)
    base = _root(root)
    folder = base / name
    fetch_sources(entry, folder, record=base / RECORD_NAME, log=say)
    location = folder if name in _IDX_DATASETS else folder / entry.files[0].filename
    say(f"{entry.title}: using {location}")
    return location


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ConfigError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}.")


def _entry(name: str, table: Mapping[str, DatasetSources]) -> DatasetSources:
    if name not in table:
        raise ConfigError(f"No sources are known for dataset {name!r}.")
    return table[name]


def _root(root: str | Path | None) -> Path:
    return Path(root).expanduser() if root is not None else default_root()


def _default_places(name: str, entry: DatasetSources, base: Path) -> list[Path]:
    places = [base / name]
    if entry.system_folder is not None:
        places.append(Path(entry.system_folder))
    return places


def _locate_or_fetch(
    name: str,
    entry: DatasetSources,
    *,
    path: str | Path | None,
    root: Path,
    download: bool,
    table: Mapping[str, DatasetSources],
    log: Log,
) -> Path:
    record = root / RECORD_NAME
    if path is not None:
        place = Path(path).expanduser()
        if not place.exists():
            raise DataError(
                f"data.path {place} does not exist; point it at {_expected_layout(name, entry)}."
            )
        found, problems = _search(name, entry, [place], record=record, log=log)
        if found is not None:
            return found
        detail = "; ".join(problems) if problems else "nothing usable was found there"
        raise DataError(
            f"data.path {place} does not hold a usable copy of {entry.title} ({detail}); point "
            f"data.path at {_expected_layout(name, entry)}."
        )
    found, problems = _search(
        name, entry, _default_places(name, entry, root), record=record, log=log
    )
    if found is not None:
        return found
    if download:
        return fetch_dataset(name, root=root, log=log, table=table)
    clause = f" ({'; '.join(problems)})" if problems else ""
    raise DataError(
        f"{entry.title} was not found{clause}; {missing_advice(entry, root / name)}, or set "
        "data.download = true."
    )


def _expected_layout(name: str, entry: DatasetSources) -> str:
    if name in _IDX_DATASETS:
        names = ", ".join(source.filename for source in entry.files)
        return f"a folder holding {names} (gzip'd or not)"
    return f"{entry.files[0].filename} or its extracted {entry.extracted_dir} folder"


def _search(
    name: str,
    entry: DatasetSources,
    places: Sequence[Path],
    *,
    record: Path,
    log: Log,
) -> tuple[Path | None, list[str]]:
    """The first place holding a usable copy, and the problems seen on the way."""
    problems: list[str] = []
    for place in places:
        if name in _IDX_DATASETS:
            found, problem = _find_idx(entry, place, record=record, log=log)
        else:
            found, problem = _find_archive(entry, place, record=record, log=log)
        if found is not None:
            log(f"{entry.title}: using {found}")
            return found, problems
        if problem is not None:
            log(f"{entry.title}: not using {place}: {problem}")
            problems.append(problem)
    return None, problems


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _find_idx(
    entry: DatasetSources, place: Path, *, record: Path, log: Log
) -> tuple[Path | None, str | None]:
    """``place`` (or the folder of a file ``place``) if it holds all four verified IDX files."""
    folder = place.parent if place.is_file() else place
    if not folder.is_dir():
        return None, None
    for source in entry.files:
        candidate = _idx_file(folder, source.filename.removesuffix(".gz"))
        if candidate is None:
            return None, f"{folder} has no {source.filename}"
        if candidate.suffix != ".gz" and source.content_sha256 is None:
            log(
                f"{candidate}: no digest of the uncompressed file is published; using it unverified"
            )
            continue
        if not verify_file(
            candidate, md5=source.md5, content_sha256=source.content_sha256, record=record
        ):
            return None, f"{candidate} does not match its official checksum"
    return folder, None


def _find_archive(
    entry: DatasetSources, place: Path, *, record: Path, log: Log
) -> tuple[Path | None, str | None]:
    """The verified archive or extracted folder at ``place``, if any."""
    archive = entry.files[0]
    candidate = place if place.is_file() else place / archive.filename
    if candidate.is_file():
        if verify_file(candidate, md5=archive.md5, record=record):
            return candidate, None
        return None, f"{candidate} does not match the official MD5 of {archive.filename}"
    if entry.extracted_dir is None or not place.is_dir():
        return None, None
    extracted = place if place.name == entry.extracted_dir else place / entry.extracted_dir
    if not extracted.is_dir():
        return None, None
    if not entry.extracted_md5:
        log(f"{extracted}: the extracted files have no published digests; using them unverified")
        return extracted, None
    for member, md5 in entry.extracted_md5:
        if not verify_file(extracted / member, md5=md5, record=record):
            missing = not (extracted / member).is_file()
            return (
                None,
                f"{extracted / member} {'is missing' if missing else 'is not the official file'}",
            )
    return extracted, None


def _read(name: str, location: Path, *, resize: str, log: Log) -> _Arrays:
    if name in _IDX_DATASETS:
        return _read_idx_dataset(location)
    if name in _CIFAR_LAYOUT:
        return _read_cifar(name, location)
    return _read_tiny_imagenet(location, resize=resize, log=log)


def _to_images(images: np.ndarray, *, pad_to_32: bool, rgb: bool) -> torch.Tensor:
    """``(n, c, h, w)`` uint8 array -> contiguous tensor, padded 28->32 and gray->RGB as asked."""
    if pad_to_32 and images.shape[2:] == (28, 28):
        images = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    if rgb and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    # Readers may return read-only views of file buffers; torch needs writable memory.
    return torch.from_numpy(np.require(images, dtype=np.uint8, requirements=["C", "W"]))


# ----------------------------------------------------------------------------------- IDX


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip'd or not) as an array of the shape in its header."""
    advice = "delete it so that it is fetched again, or replace it with the official file"
    try:
        raw = path.read_bytes()
        content = gzip.decompress(raw) if raw[:2] == _GZIP_MAGIC else raw
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a readable IDX file ({error}); {advice}.") from error
    if len(content) < 4 or content[:3] != bytes((0, 0, _IDX_UBYTE)):
        raise DataError(f"{path} does not start with the IDX magic number of uint8 data; {advice}.")
    ndim = content[3]
    header = 4 + 4 * ndim
    if len(content) < header:
        raise DataError(f"{path} ends inside its IDX header; {advice}.")
    shape = struct.unpack(f">{ndim}I", content[4:header])
    expected = header + math.prod(shape)
    if len(content) != expected:
        raise DataError(
            f"{path} holds {len(content)} bytes but its IDX header announces {expected} "
            f"(truncated or corrupt); {advice}."
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape)


def _read_idx_dataset(folder: Path) -> _Arrays:
    arrays: list[np.ndarray] = []
    for stem in _IDX_STEMS:
        path = _idx_file(folder, stem)
        if path is None:
            raise DataError(f"{folder} has no {stem}.gz; put the official file there.")
        array = _read_idx(path)
        expected_ndim = 3 if "images" in stem else 1
        if array.ndim != expected_ndim:
            raise DataError(
                f"{path} holds a {array.ndim}-dimensional array instead of {expected_ndim}; "
                "replace it with the official file."
            )
        arrays.append(array)
    x_train, y_train, x_test, y_test = arrays
    for images, labels, split in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"The {split} files in {folder} hold {images.shape[0]} images but "
                f"{labels.shape[0]} labels; replace them with the official files."
            )
    return x_train[:, None], y_train, x_test[:, None], y_test


# --------------------------------------------------------------------------------- CIFAR


def _numpy_reconstruct() -> Any:
    # numpy 2 moved numpy.core to numpy._core; the official files, pickled under numpy 1, name
    # the old module, and importing it on numpy 2 warns, so the new one is tried first.
    try:
        module: ModuleType = importlib.import_module("numpy._core.multiarray")
    except ImportError:
        module = importlib.import_module("numpy.core.multiarray")
    return module._reconstruct


def _latin1_encode(text: str, encoding: str) -> bytes:
    """Python 3's protocol-2 pickles store bytes as ``_codecs.encode(text, "latin1")``."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed in a CIFAR batch")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and nothing else.

    The CIFAR files are pickles, and a plain ``pickle.load`` of a tampered file can run any code
    (``os.system`` and the like are just globals a pickle names). Only the globals that the
    official files (and copies re-pickled by Python 3) need are resolved; any other is refused.
    """

    def find_class(self, module: str, name: str, /) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _unpickle_batch(raw: bytes, *, where: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch pickle -> images ``(n, 3, 32, 32)`` uint8 and labels ``(n,)``."""
    advice = "replace it with the official file"
    try:
        batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    # A malformed or hostile pickle can fail with nearly any exception type.
    except Exception as error:
        raise DataError(f"{where} is not a valid CIFAR batch ({error}); {advice}.") from error
    if not isinstance(batch, dict):
        raise DataError(f"{where} does not hold a dictionary like a CIFAR batch; {advice}.")
    entries = {
        key.decode("latin1") if isinstance(key, bytes) else key: value
        for key, value in batch.items()
    }
    data = entries.get("data")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise DataError(f"{where} has no uint8 'data' matrix; {advice}.")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where} holds rows of {data.shape[1]} values instead of 3072; {advice}.")
    labels = np.asarray(entries.get(label_key))
    if (
        labels.ndim != 1
        or labels.shape[0] != data.shape[0]
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DataError(
            f"{where} has no integer '{label_key}' list with one label per image; {advice}."
        )
    # Rows are row-major R, G, B planes of 32x32.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_members(location: Path, wanted: Sequence[str]) -> dict[str, bytes]:
    """The raw bytes of the wanted batch files, from the extracted folder or the tarball."""
    if location.is_dir():
        missing = [member for member in wanted if not (location / member).is_file()]
        if missing:
            raise DataError(f"{location} has no {missing[0]}; extract the official archive again.")
        return {member: (location / member).read_bytes() for member in wanted}
    found: dict[str, bytes] = {}
    try:
        # One sequential pass: seeking backwards in a .tar.gz means decompressing again.
        with tarfile.open(location, "r:*") as archive:
            for member in archive:
                short = member.name.rsplit("/", 1)[-1]
                if member.isfile() and short in wanted and short not in found:
                    handle = archive.extractfile(member)
                    if handle is not None:
                        found[short] = handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DataError(
            f"{location} is not a readable tar archive ({error}); download it again."
        ) from error
    missing = [member for member in wanted if member not in found]
    if missing:
        raise DataError(
            f"{location} has no member {missing[0]}; download the official archive again."
        )
    return found


def _read_cifar(name: str, location: Path) -> _Arrays:
    train_members, test_members, label_key = _CIFAR_LAYOUT[name]
    raw = _cifar_members(location, (*train_members, *test_members))

    def stack(members: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        batches = [
            _unpickle_batch(raw[member], where=f"{location}:{member}", label_key=label_key)
            for member in members
        ]
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    x_train, y_train = stack(train_members)
    x_test, y_test = stack(test_members)
    return x_train, y_train, x_test, y_test


# ------------------------------------------------------------------------- Tiny-ImageNet


def _pillow_image() -> ModuleType:
    try:
        return importlib.import_module("PIL.Image")
    except ImportError as error:
        raise DataError(
            'Reading Tiny-ImageNet needs Pillow; install it with pip install "fedssd[images]".'
        ) from error


def _tiny_signature(location: Path) -> str:
    """Identifies the source a decoded cache was made from (size and mtime of its key files)."""
    files = (
        [location]
        if location.is_file()
        else [location / "wnids.txt", location / "val" / "val_annotations.txt"]
    )
    parts = [location.name]
    for file in files:
        stat = file.stat()
        parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def _tiny_cache_name(resize: str) -> str:
    """The decoded cache's file name for a filter; each filter has its own, so they never mix."""
    return f"tiny-imagenet-200-{_TINY_SIZE}x{_TINY_SIZE}-{resize}.npz"


def _read_tiny_imagenet(location: Path, *, resize: str, log: Log) -> _Arrays:
    """Tiny-ImageNet-200 at 32x32: from the decoded cache next to the data, else by decoding."""
    cache = location.parent / _tiny_cache_name(resize)
    try:
        signature = _tiny_signature(location)
    except OSError as error:
        raise DataError(
            f"{location} is not a complete tiny-imagenet-200 folder ({error}); extract the "
            "official zip again."
        ) from error
    cached = _load_tiny_cache(cache, signature)
    if cached is not None:
        log(f"Tiny-ImageNet-200: using the decoded images in {cache}")
        return cached
    arrays = _decode_tiny_imagenet(location, resize=resize, log=log)
    _save_tiny_cache(cache, arrays, signature, log=log)
    return arrays


def _load_tiny_cache(cache: Path, signature: str) -> _Arrays | None:
    if not cache.is_file():
        return None
    # A stale or damaged cache is simply rebuilt.
    try:
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["source"]) != signature:
                return None
            x_train, y_train, x_test, y_test = (stored[key] for key in _NPZ_KEYS)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return x_train, y_train, x_test, y_test


def _save_tiny_cache(cache: Path, arrays: _Arrays, signature: str, *, log: Log) -> None:
    temp = temporary_sibling(cache)
    x_train, y_train, x_test, y_test = arrays
    try:
        with temp.open("xb") as out:
            np.savez(
                out,
                x_train=x_train,
                y_train=y_train,
                x_test=x_test,
                y_test=y_test,
                source=np.array(signature),
            )
        os.replace(temp, cache)
    except OSError as error:
        temp.unlink(missing_ok=True)
        log(
            f"Tiny-ImageNet-200: could not write the decoded cache {cache} ({error}); "
            "the images will be decoded again next time"
        )
        return
    log(f"Tiny-ImageNet-200: saved the decoded images to {cache}")


def _decode_tiny_imagenet(location: Path, *, resize: str, log: Log) -> _Arrays:
    image_module = _pillow_image()
    try:
        if location.is_file():
            with zipfile.ZipFile(location) as archive:
                prefix = "tiny-imagenet-200/"
                names = [n.removeprefix(prefix) for n in archive.namelist() if n.startswith(prefix)]
                return _decode_tiny_tree(
                    names,
                    lambda rel: archive.read(prefix + rel),
                    image_module=image_module,
                    resize=resize,
                    log=log,
                )
        names = [p.relative_to(location).as_posix() for p in (location / "train").rglob("*.JPEG")]
        return _decode_tiny_tree(
            names,
            lambda rel: (location / rel).read_bytes(),
            image_module=image_module,
            resize=resize,
            log=log,
        )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(
            f"{location} is not a readable Tiny-ImageNet-200 copy ({error}); download the "
            "official zip again."
        ) from error


def _decode_tiny_tree(
    names: Sequence[str],
    read: Callable[[str], bytes],
    *,
    image_module: ModuleType,
    resize: str,
    log: Log,
) -> _Arrays:
    """Decode the train and val images of a tiny-imagenet-200 tree.

    Classes are the wnids in sorted order (as a folder-per-class loader would number them); the
    val set, labelled by ``val/val_annotations.txt``, serves as the test set.
    """
    wnids = sorted(set(read("wnids.txt").decode("ascii").split()))
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train = sorted(n for n in names if n.startswith("train/") and n.endswith(".JPEG"))
    y_train = np.array([index[n.split("/")[1]] for n in train], dtype=np.int64)
    annotated = sorted(
        line.split("\t")[:2]
        for line in read("val/val_annotations.txt").decode("ascii").splitlines()
        if line.strip()
    )
    test = [f"val/images/{file}" for file, _ in annotated]
    y_test = np.array([index[wnid] for _, wnid in annotated], dtype=np.int64)
    log(f"Tiny-ImageNet-200: decoding {len(train)} train and {len(test)} val images (once)")
    x_train = _decode_images(train, read, image_module=image_module, resize=resize, log=log)
    x_test = _decode_images(test, read, image_module=image_module, resize=resize, log=log)
    return x_train, y_train, x_test, y_test


def _decode_images(
    names: Sequence[str],
    read: Callable[[str], bytes],
    *,
    image_module: ModuleType,
    resize: str,
    log: Log,
) -> np.ndarray:
    """JPEG files -> ``(n, 3, 32, 32)`` uint8.

    The 64x64 images are reduced with the filter ``resize`` names. ``"box"`` is Pillow's BOX
    filter: for the exact factor 2 each output pixel is the mean of a 2x2 block, an antialiased
    reduction with no ringing. ``"bilinear-antialias"`` is :func:`resize_bilinear_antialias`.
    """
    out = np.empty((len(names), _TINY_SIZE, _TINY_SIZE, 3), dtype=np.uint8)
    size = (_TINY_SIZE, _TINY_SIZE)
    for i, name in enumerate(names):
        with image_module.open(io.BytesIO(read(name))) as image:
            picture = image.convert("RGB")
        if picture.size == size:
            out[i] = np.asarray(picture)
        elif resize == "box":
            out[i] = np.asarray(picture.resize(size, image_module.Resampling.BOX))
        else:
            chw = torch.from_numpy(np.asarray(picture).transpose(2, 0, 1).copy())
            out[i] = resize_bilinear_antialias(chw[None], _TINY_SIZE)[0].permute(1, 2, 0).numpy()
        if (i + 1) % _TINY_PROGRESS_EVERY == 0:
            log(f"Tiny-ImageNet-200: decoded {i + 1} of {len(names)}")
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def resize_bilinear_antialias(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images ``(n, c, h, w)`` to ``(n, c, size, size)``, antialiased bilinear.

    This is what torchvision's ``transforms.Resize(size, antialias=True)`` (bilinear, its
    default) computes for a uint8 tensor: the images are cast to float32, resized with
    ``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)``,
    rounded to the nearest integer and cast back to uint8. When shrinking, each output pixel is
    a weighted mean of the inputs under a triangle filter stretched by the reduction factor (for
    64 -> 32: weights 1/8, 3/8, 3/8, 1/8 over 4 pixels per axis, renormalised where the window
    leaves the image). The weights are non-negative, so the result stays within 0..255; the clamp
    only guards the cast. (torchvision's v2 transforms, on CPUs with AVX2, hand uint8 tensors to
    PyTorch's integer kernel instead, whose fixed-point rounding can differ by one grey level;
    this float form is its v1 tensor path and its path everywhere else. torchvision is not needed.)
    """
    resized = torch.nn.functional.interpolate(
        images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------- npz


def _read_npz(path: Path, *, require_test: bool = True) -> _Arrays:
    """A user's ``.npz`` with uint8 images NHW or NHWC (C in {1, 3}) and integer labels."""
    if not path.is_file():
        raise DataError(f"data.path {path} is not a file; point it at your .npz file.")
    advice = "save plain numeric arrays with numpy.savez"
    try:
        with path.open("rb") as probe:
            magic = probe.read(4)
    except OSError as error:
        raise DataError(f"Cannot read {path} ({error.strerror}); check its permissions.") from error
    # Checked here because np.load reads anything else as a .npy or a pickle, and its error for a
    # pickle recommends allow_pickle=True, which would let the file run code.
    if magic not in _ZIP_MAGICS:
        raise DataError(f"{path} is not an .npz archive (a zip of .npy arrays); {advice}.")
    # numpy's own messages span several sentences and give advice that does not apply here, so
    # each failure is reported in a sentence of ours.
    try:
        with np.load(path, allow_pickle=False) as stored:
            present = set(stored.files)
            loaded: dict[str, object] = {key: stored[key] for key in _NPZ_KEYS if key in present}
    except OSError as error:
        raise DataError(f"Cannot read {path} ({error.strerror}); check its permissions.") from error
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise DataError(
            f"{path} is a damaged .npz archive (truncated or corrupt); save it again with "
            "numpy.savez."
        ) from error
    except ValueError as error:
        raise DataError(
            f"{path} holds an entry that is not a plain numeric .npy array (an object array, or a "
            f"damaged one); {advice}."
        ) from error
    except MemoryError as error:
        raise DataError(
            f"{path} announces an array too large for this machine's memory; {advice}."
        ) from error
    missing = [key for key in _NPZ_KEYS if key not in loaded]
    if missing == ["y_train", "x_test", "y_test"]:
        return _unlabelled_npz(loaded["x_train"], path=path, advice=advice)
    if missing == ["x_test", "y_test"] and not require_test:
        # A labelled set without a test split: an empty one of the same image shape.
        train = loaded["x_train"]
        if isinstance(train, np.ndarray) and train.ndim >= 1:
            loaded["x_test"] = train[:0]
            loaded["y_test"] = np.zeros(0, dtype=np.int64)
            missing = []
    if missing:
        raise DataError(
            f"{path} has no array {missing[0]!r}; it needs x_train, y_train, x_test and y_test "
            "(or x_train alone, for unlabelled images)."
        )
    arrays: dict[str, np.ndarray] = {}
    for key, value in loaded.items():
        # NpzFile returns the raw bytes of a member that is not named *.npy.
        if not isinstance(value, np.ndarray):
            raise DataError(f"{path}: {key} is not a .npy array inside the archive; {advice}.")
        arrays[key] = value
    images = {
        key: _npz_images(
            arrays[key], key=key, path=path, allow_empty=key == "x_test" and not require_test
        )
        for key in ("x_train", "x_test")
    }
    if images["x_train"].shape[1:] != images["x_test"].shape[1:]:
        raise DataError(
            f"{path}: x_train images are {_describe(images['x_train'])} but x_test images are "
            f"{_describe(images['x_test'])}; both sets need the same size and channels."
        )
    train_count = images["x_train"].shape[0]
    for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
        _check_npz_labels(
            arrays[y_key],
            count=images[x_key].shape[0],
            train_count=train_count,
            key=y_key,
            path=path,
        )
    return images["x_train"], arrays["y_train"], images["x_test"], arrays["y_test"]


def _unlabelled_npz(value: object, *, path: Path, advice: str) -> _Arrays:
    """``x_train`` alone: every label -1 and an empty test set of the same image shape."""
    if not isinstance(value, np.ndarray):
        raise DataError(f"{path}: x_train is not a .npy array inside the archive; {advice}.")
    images = _npz_images(value, key="x_train", path=path)
    return (
        images,
        np.full(images.shape[0], -1, dtype=np.int64),
        images[:0],
        np.zeros(0, dtype=np.int64),
    )


def _describe(images: np.ndarray) -> str:
    channels, height, width = images.shape[1:]
    return f"{height}x{width} with {channels} channel{'s' if channels > 1 else ''}"


def _npz_images(
    array: np.ndarray, *, key: str, path: Path, allow_empty: bool = False
) -> np.ndarray:
    """NHW or NHWC uint8 -> ``(n, c, h, w)``."""
    if array.dtype != np.uint8:
        raise DataError(f"{path}: {key} has dtype {array.dtype}; images must be uint8 (0-255).")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"{path}: {key} has shape {array.shape}; images must be (n, height, width) or "
            "(n, height, width, channels) with 1 or 3 channels."
        )
    if array.shape[0] == 0 and not allow_empty:
        raise DataError(f"{path}: {key} holds no images; both sets need at least one.")
    return array


def _check_npz_labels(
    labels: np.ndarray, *, count: int, train_count: int, key: str, path: Path
) -> None:
    """Labels must be class ids ``0..C-1``; C cannot exceed the number of training images.

    The bound keeps ``num_classes = max label + 1`` sane: a stray label such as 10**9 would
    otherwise make every per-class table (histograms, the linear probe) that large.
    """
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise DataError(
            f"{path}: {key} has dtype {labels.dtype} and shape {labels.shape}; labels must be a "
            "1-D integer array."
        )
    if labels.shape[0] != count:
        raise DataError(f"{path}: {key} holds {labels.shape[0]} labels for {count} images.")
    if labels.size == 0:
        return
    if labels.min() < 0:
        raise DataError(
            f"{path}: {key} contains the negative label {labels.min()}; labels must be >= 0."
        )
    largest = int(labels.max())
    if largest >= train_count:
        raise DataError(
            f"{path}: {key} contains the label {largest} but there are only {train_count} "
            "training images; labels must be class ids 0..C-1 with C at most the number of "
            "training images."
        )
