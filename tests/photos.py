"""The CIFAR-10 photos beside the repository (``../shared/data/cifar10-jpeg.tar.gz``: JPEG files
``train/<class>/NNNN.jpg`` and ``test/<class>/NNNN.jpg``) and small parts of them for tests.

A clone without that file skips the tests that need it, with a reason that names the file.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
TARBALL = REPOSITORY.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def tarball() -> Path:
    """The photos' archive, or a skip that names the missing file."""
    if not TARBALL.is_file():
        pytest.skip(
            f"{TARBALL} is absent: these tests need the CIFAR-10 photos as "
            "../shared/data/cifar10-jpeg.tar.gz beside the repository"
        )
    return TARBALL


def extract_subset(target: Path, *, train_per_class: int, test_per_class: int) -> Path:
    """Copy a stratified part of the photos into ``target`` as ``train/<class>/`` and
    ``test/<class>/`` (the ImageFolder layout of the archive itself).

    The part is drawn from the archive's test split alone, in archive order: for each class, the
    first ``train_per_class`` photos go to ``train/``, the next ``test_per_class`` to ``test/``.
    The archive lists its test split first, so reading stops after about a sixth of it instead
    of decompressing all 60,000 members (a layout in another order is still read correctly,
    only further).
    """
    wanted = train_per_class + test_per_class
    taken = dict.fromkeys(CIFAR10_CLASSES, 0)
    with tarfile.open(tarball(), "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] != "test":
                continue
            name = parts[1]
            if taken[name] == wanted:
                if all(count == wanted for count in taken.values()):
                    break
                continue
            split = "train" if taken[name] < train_per_class else "test"
            out = target / split / name / parts[2]
            out.parent.mkdir(parents=True, exist_ok=True)
            handle = tar.extractfile(member)
            assert handle is not None
            out.write_bytes(handle.read())
            taken[name] += 1
    assert all(count == wanted for count in taken.values()), taken
    return target
