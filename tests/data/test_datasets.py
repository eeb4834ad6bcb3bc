"""Dataset readers and lookup order, on tiny files written here and on the real Fashion-MNIST."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import fedssd.data.datasets as datasets_module
import fedssd.data.fetch as fetch_module
from fedssd.data.datasets import (
    DATASET_NAMES,
    ImageDataset,
    load_dataset,
    locate_dataset,
    resize_bilinear_antialias,
)
from fedssd.data.fetch import CHECKSUMS, DatasetSources, Source, default_root
from fedssd.errors import ConfigError, DataError
from helpers import one_sentence

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------- IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def tiny_idx_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8),
        np.array([0, 1, 2, 9, 4, 5], dtype=np.uint8),
        rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8),
        np.array([7, 8, 3], dtype=np.uint8),
    )


def write_idx_folder(
    folder: Path, arrays: tuple[np.ndarray, ...], *, compress: bool = True
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in zip(IDX_STEMS, arrays, strict=True):
        data = idx_bytes(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (folder / stem).write_bytes(data)


def idx_table(
    folder: Path,
    name: str,
    *,
    with_content: bool = False,
    system_folder: Path | None = None,
    install_hint: str | None = None,
) -> Mapping[str, DatasetSources]:
    """A checksum table whose digests are those of the IDX files written in ``folder``."""
    files = []
    for stem in IDX_STEMS:
        packed = folder / f"{stem}.gz"
        content = sha256_of(gzip.decompress(packed.read_bytes())) if with_content else None
        files.append(
            Source(filename=f"{stem}.gz", urls=(), md5=md5_of(packed), content_sha256=content)
        )
    entry = DatasetSources(
        title="Tiny IDX",
        files=tuple(files),
        system_folder=str(system_folder) if system_folder is not None else None,
        install_hint=install_hint,
    )
    return {name: entry}


def test_idx_reader_values_and_labels(tmp_path: Path) -> None:
    arrays = tiny_idx_arrays()
    write_idx_folder(tmp_path / "data", arrays)
    table = idx_table(tmp_path / "data", "mnist")
    dataset = load_dataset(
        "mnist",
        path=tmp_path / "data",
        root=tmp_path / "root",
        pad_to_32=False,
        rgb=False,
        table=table,
    )
    assert dataset.x_train.shape == (6, 1, 28, 28)
    assert dataset.x_test.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(dataset.x_train[:, 0].numpy(), arrays[0])
    np.testing.assert_array_equal(dataset.x_test[:, 0].numpy(), arrays[2])
    assert dataset.y_train.tolist() == [0, 1, 2, 9, 4, 5]
    assert dataset.y_test.tolist() == [7, 8, 3]
    assert dataset.y_train.dtype.is_floating_point is False
    assert str(dataset.y_train.dtype) == "torch.int64"
    assert dataset.num_classes == 10


def test_padding_and_rgb_conversion(tmp_path: Path) -> None:
    arrays = tiny_idx_arrays(1)
    write_idx_folder(tmp_path / "data", arrays)
    table = idx_table(tmp_path / "data", "mnist")
    dataset = load_dataset("mnist", path=tmp_path / "data", root=tmp_path / "root", table=table)
    x = dataset.x_train.numpy()
    assert x.shape == (6, 3, 32, 32)
    assert x.dtype == np.uint8
    assert dataset.x_train.is_contiguous()
    for channel in range(3):
        np.testing.assert_array_equal(x[:, channel, 2:30, 2:30], arrays[0])
    border = np.ones((32, 32), dtype=bool)
    border[2:30, 2:30] = False
    assert not x[:, :, border].any()


def test_uncompressed_idx_files_are_accepted(tmp_path: Path) -> None:
    arrays = tiny_idx_arrays(2)
    write_idx_folder(tmp_path / "packed", arrays)
    write_idx_folder(tmp_path / "plain", arrays, compress=False)
    logs: list[str] = []
    # Without a content digest the plain files cannot be verified: used, and the log says so.
    table = idx_table(tmp_path / "packed", "mnist")
    dataset = load_dataset(
        "mnist", path=tmp_path / "plain", root=tmp_path / "root", table=table, log=logs.append
    )
    np.testing.assert_array_equal(dataset.x_test[:, 0, 2:30, 2:30].numpy(), arrays[2])
    assert any("unverified" in line for line in logs)
    # With the content digest they are verified, and a changed byte is refused.
    table = idx_table(tmp_path / "packed", "fashion_mnist", with_content=True)
    load_dataset("fashion_mnist", path=tmp_path / "plain", root=tmp_path / "root", table=table)
    plain = tmp_path / "plain" / "t10k-labels-idx1-ubyte"
    plain.write_bytes(plain.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataError, match="does not match its official checksum"):
        load_dataset("fashion_mnist", path=tmp_path / "plain", root=tmp_path / "root", table=table)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: gzip.compress(data[:-5], mtime=0), "truncated or corrupt"),
        (lambda data: gzip.compress(data, mtime=0)[:-20], "not a readable IDX file"),
        (lambda data: gzip.compress(b"\x00\x00\x0d" + data[3:], mtime=0), "magic number"),
    ],
)
def test_corrupt_idx_file_names_the_file(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    arrays = tiny_idx_arrays(3)
    folder = tmp_path / "data"
    write_idx_folder(folder, arrays)
    target = folder / "train-images-idx3-ubyte.gz"
    target.write_bytes(damage(idx_bytes(arrays[0])))
    # The table vouches for the damaged file, so the reader itself must catch the damage.
    table = idx_table(folder, "mnist")
    with pytest.raises(DataError, match=message) as caught:
        load_dataset("mnist", path=folder, root=tmp_path / "root", table=table)
    assert str(target) in str(caught.value)
    assert one_sentence(str(caught.value))


def test_image_and_label_counts_must_agree(tmp_path: Path) -> None:
    x_train, _, x_test, y_test = tiny_idx_arrays(4)
    folder = tmp_path / "data"
    write_idx_folder(folder, (x_train, np.zeros(5, np.uint8), x_test, y_test))
    with pytest.raises(DataError, match="6 images but 5 labels"):
        load_dataset("mnist", path=folder, root=tmp_path / "root", table=idx_table(folder, "mnist"))


def test_explicit_path_with_wrong_checksum_is_refused(tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "official", tiny_idx_arrays(5))
    write_idx_folder(tmp_path / "other", tiny_idx_arrays(6))
    table = idx_table(tmp_path / "official", "mnist")
    with pytest.raises(DataError, match="does not match its official checksum") as caught:
        load_dataset("mnist", path=tmp_path / "other", root=tmp_path / "root", table=table)
    assert "point data.path at" in str(caught.value)
    assert one_sentence(str(caught.value))
    assert (
        locate_dataset("mnist", path=tmp_path / "other", root=tmp_path / "root", table=table)
        is None
    )


def test_lookup_order_root_then_system_folder_then_error(tmp_path: Path) -> None:
    arrays = tiny_idx_arrays(7)
    system = tmp_path / "usr-share"
    write_idx_folder(system, arrays)
    root = tmp_path / "root"
    table = idx_table(
        system, "fashion_mnist", system_folder=system, install_hint="apt-get install pkg"
    )
    logs: list[str] = []
    found = locate_dataset("fashion_mnist", root=root, table=table, log=logs.append)
    assert found == system
    assert logs == [f"Tiny IDX: using {system}"]
    # A copy in <root>/<name> comes first.
    write_idx_folder(root / "fashion_mnist", arrays)
    assert locate_dataset("fashion_mnist", root=root, table=table) == root / "fashion_mnist"
    # With neither, and downloads off, the error says what to install and what to put where.
    for stem in IDX_STEMS:
        (system / f"{stem}.gz").unlink()
        (root / "fashion_mnist" / f"{stem}.gz").unlink()
    with pytest.raises(DataError) as caught:
        load_dataset("fashion_mnist", root=root, download=False, table=table)
    message = str(caught.value)
    assert one_sentence(message)
    assert "`apt-get install pkg`" in message
    assert str(root / "fashion_mnist") in message
    assert all(f"{stem}.gz" in message for stem in IDX_STEMS)
    assert "data.path" in message


def test_real_table_names_debian_package_and_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = CHECKSUMS["fashion_mnist"]
    assert entry.system_folder == str(DEBIAN_FASHION)
    missing = {
        "fashion_mnist": DatasetSources(
            title=entry.title, files=entry.files, install_hint=entry.install_hint
        )
    }
    monkeypatch.setenv("FEDSSD_DATA", str(tmp_path / "env-root"))
    with pytest.raises(DataError) as caught:
        load_dataset("fashion_mnist", download=False, table=missing)
    message = str(caught.value)
    assert "`apt-get install dataset-fashion-mnist`" in message
    assert str(tmp_path / "env-root" / "fashion_mnist") in message


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSSD_DATA", str(tmp_path))
    assert default_root() == tmp_path
    monkeypatch.delenv("FEDSSD_DATA")
    assert default_root() == Path.home() / ".cache" / "fedssd"


def test_unknown_name_and_names_list() -> None:
    assert DATASET_NAMES == (
        "fashion_mnist",
        "mnist",
        "cifar10",
        "cifar100",
        "tiny_imagenet",
        "npz",
        "folder",
    )
    with pytest.raises(ConfigError, match="Unknown dataset 'imagenet'"):
        load_dataset("imagenet")


# ----------------------------------------------------------------------------------- CIFAR


def cifar_batch(
    rng: np.random.Generator, count: int, *, label_key: bytes, num_classes: int
) -> dict[bytes, Any]:
    batch: dict[bytes, Any] = {
        b"data": rng.integers(0, 256, size=(count, 3072), dtype=np.uint8),
        label_key: rng.integers(0, num_classes, size=count).tolist(),
        b"batch_label": b"testing batch",
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = rng.integers(0, 20, size=count).tolist()
    return batch


def official_style_pickle(batch: object) -> bytes:
    """Protocol 2 naming numpy.core.multiarray, as the official files (numpy 1.x) do."""
    data = pickle.dumps(batch, protocol=2)
    return data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def write_tar(path: Path, members: Mapping[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def archive_table(name: str, archive: Path, extracted_dir: str) -> Mapping[str, DatasetSources]:
    source = Source(filename=archive.name, urls=(), md5=md5_of(archive))
    return {name: DatasetSources(title=name, files=(source,), extracted_dir=extracted_dir)}


def test_cifar10_tarball_and_extracted_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {n: cifar_batch(rng, 4, label_key=b"labels", num_classes=10) for n in names}
    members = {f"cifar-10-batches-py/{n}": official_style_pickle(b) for n, b in batches.items()}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": []}, protocol=2)
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_tar(archive, members)
    table = archive_table("cifar10", archive, "cifar-10-batches-py")
    dataset = load_dataset("cifar10", path=archive, root=tmp_path / "root", table=table)

    train = [batches[n] for n in names[:5]]
    expected_rows = np.concatenate([b[b"data"] for b in train])
    assert dataset.x_train.shape == (20, 3, 32, 32)
    assert dataset.x_test.shape == (4, 3, 32, 32)
    x = dataset.x_train.numpy()
    # Row layout: 1024 red values row-major, then green, then blue.
    for row in (0, 7, 19):
        for channel, i, j in ((0, 0, 0), (1, 5, 31), (2, 31, 7)):
            assert x[row, channel, i, j] == expected_rows[row, channel * 1024 + i * 32 + j]
    assert dataset.y_train.tolist() == [label for b in train for label in b[b"labels"]]
    assert dataset.y_test.tolist() == batches["test_batch"][b"labels"]
    assert dataset.num_classes == 10

    extracted = tmp_path / "unpacked"
    with tarfile.open(archive) as opened:
        opened.extractall(extracted, filter="data")
    folder_table = {
        "cifar10": DatasetSources(
            title="cifar10", files=table["cifar10"].files, extracted_dir="cifar-10-batches-py"
        )
    }
    for place in (extracted, extracted / "cifar-10-batches-py"):
        again = load_dataset("cifar10", path=place, root=tmp_path / "root", table=folder_table)
        assert bool((again.x_train == dataset.x_train).all())
        assert bool((again.y_test == dataset.y_test).all())


def test_cifar_extracted_member_digests_are_checked(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for member in ("train", "test"):
        (folder / member).write_bytes(
            pickle.dumps(cifar_batch(rng, 3, label_key=b"fine_labels", num_classes=100), protocol=2)
        )
    source = Source(filename="cifar-100-python.tar.gz", urls=(), md5="0" * 32)
    good = {
        "cifar100": DatasetSources(
            title="CIFAR-100",
            files=(source,),
            extracted_dir="cifar-100-python",
            extracted_md5=(("train", md5_of(folder / "train")), ("test", md5_of(folder / "test"))),
        )
    }
    assert locate_dataset("cifar100", path=tmp_path, root=tmp_path / "root", table=good) == folder
    bad = {
        "cifar100": DatasetSources(
            title="CIFAR-100",
            files=(source,),
            extracted_dir="cifar-100-python",
            extracted_md5=(("train", "0" * 32), ("test", md5_of(folder / "test"))),
        )
    }
    with pytest.raises(DataError, match="is not the official file"):
        load_dataset("cifar100", path=tmp_path, root=tmp_path / "root", table=bad)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train = cifar_batch(rng, 5, label_key=b"fine_labels", num_classes=100)
    test = cifar_batch(rng, 2, label_key=b"fine_labels", num_classes=100)
    archive = tmp_path / "cifar-100-python.tar.gz"
    write_tar(
        archive,
        {
            "cifar-100-python/train": official_style_pickle(train),
            "cifar-100-python/test": pickle.dumps(test, protocol=4),
        },
    )
    table = archive_table("cifar100", archive, "cifar-100-python")
    dataset = load_dataset("cifar100", path=tmp_path, root=tmp_path / "root", table=table)
    assert dataset.y_train.tolist() == train[b"fine_labels"]
    assert dataset.y_test.tolist() == test[b"fine_labels"]
    assert dataset.num_classes == 100
    np.testing.assert_array_equal(dataset.x_test.numpy().reshape(2, -1), test[b"data"])


class _Exploit:
    """Pickles to ``os.system(command)``: what a tampered CIFAR file could contain."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def test_cifar_pickle_with_forbidden_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    rng = np.random.default_rng(3)
    hostile = cifar_batch(rng, 2, label_key=b"labels", num_classes=10)
    hostile[b"batch_label"] = _Exploit(f"touch {marker}")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = (
            hostile
            if member == "data_batch_3"
            else cifar_batch(rng, 2, label_key=b"labels", num_classes=10)
        )
        (folder / member).write_bytes(pickle.dumps(batch, protocol=2))
    source = Source(filename="cifar-10-python.tar.gz", urls=(), md5="0" * 32)
    table = {
        "cifar10": DatasetSources(
            title="CIFAR-10", files=(source,), extracted_dir="cifar-10-batches-py"
        )
    }
    with pytest.raises(
        DataError, match=r"posix\.system is not allowed|os\.system is not allowed"
    ) as caught:
        load_dataset("cifar10", path=folder, root=tmp_path / "root", table=table)
    assert "data_batch_3" in str(caught.value)
    assert not marker.exists()


def test_cifar_batch_with_wrong_shape_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    bad = {b"data": np.zeros((2, 100), dtype=np.uint8), b"fine_labels": [0, 1]}
    (folder / "train").write_bytes(pickle.dumps(bad, protocol=2))
    (folder / "test").write_bytes(pickle.dumps(bad, protocol=2))
    source = Source(filename="cifar-100-python.tar.gz", urls=(), md5="0" * 32)
    table = {
        "cifar100": DatasetSources(
            title="CIFAR-100", files=(source,), extracted_dir="cifar-100-python"
        )
    }
    with pytest.raises(DataError, match="rows of 100 values instead of 3072"):
        load_dataset("cifar100", path=folder, root=tmp_path / "root", table=table)


# --------------------------------------------------------------------------- Tiny-ImageNet


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tiny_imagenet(folder: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 3-class tree; images are lossless PNG bytes in .JPEG files so decoding is exact.

    Returns the 64x64 pixels by relative path.
    """
    wnids = ["n03", "n01", "n02"]  # deliberately unsorted, like the official wnids.txt
    pixels: dict[str, np.ndarray] = {}
    (folder / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        for k in range(2):
            rel = f"train/{wnid}/images/{wnid}_{k}.JPEG"
            pixels[rel] = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    annotations = []
    for k, wnid in enumerate(["n02", "n03", "n01", "n02"]):
        rel = f"val/images/val_{k}.JPEG"
        pixels[rel] = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    for rel, image in pixels.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(png_bytes(image))
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return pixels


def box_reduce(pixels: np.ndarray) -> np.ndarray:
    """Reference: the mean of each 2x2 block, ``(64, 64, 3)`` -> ``(3, 32, 32)``."""
    blocks: np.ndarray = pixels.astype(np.float64).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    return blocks.transpose(2, 0, 1)


def tiny_table() -> Mapping[str, DatasetSources]:
    source = Source(filename="tiny-imagenet-200.zip", urls=(), md5="0" * 32)
    return {
        "tiny_imagenet": DatasetSources(
            title="Tiny-ImageNet-200", files=(source,), extracted_dir="tiny-imagenet-200"
        )
    }


def test_tiny_imagenet_folder_decode_cache_and_zip(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "tiny-imagenet-200"
    pixels = write_tiny_imagenet(folder, np.random.default_rng(0))
    logs: list[str] = []
    dataset = load_dataset(
        "tiny_imagenet", path=folder, root=tmp_path / "root", table=tiny_table(), log=logs.append
    )
    assert dataset.x_train.shape == (6, 3, 32, 32)
    assert dataset.x_test.shape == (4, 3, 32, 32)
    assert dataset.num_classes == 200
    # Sorted wnids: n01 -> 0, n02 -> 1, n03 -> 2; train sorted by class then file.
    assert dataset.y_train.tolist() == [0, 0, 1, 1, 2, 2]
    assert dataset.y_test.tolist() == [1, 2, 0, 1]
    first = pixels["train/n01/images/n01_0.JPEG"]
    difference = dataset.x_train[0].numpy().astype(np.float64) - box_reduce(first)
    assert np.abs(difference).max() <= 1.0
    last_val = pixels["val/images/val_3.JPEG"]
    assert np.abs(dataset.x_test[3].numpy() - box_reduce(last_val)).max() <= 1.0

    cache = tmp_path / "data" / "tiny-imagenet-200-32x32-box.npz"
    assert cache.is_file()
    assert not [p for p in cache.parent.iterdir() if p.suffix == ".part"]
    logs.clear()
    cached = load_dataset(
        "tiny_imagenet", path=folder, root=tmp_path / "root", table=tiny_table(), log=logs.append
    )
    assert any("using the decoded images" in line for line in logs)
    assert bool((cached.x_train == dataset.x_train).all())
    assert bool((cached.y_test == dataset.y_test).all())

    archive = tmp_path / "zipped" / "tiny-imagenet-200.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out.write(path, f"tiny-imagenet-200/{path.relative_to(folder).as_posix()}")
    source = Source(filename=archive.name, urls=(), md5=md5_of(archive))
    table = {
        "tiny_imagenet": DatasetSources(
            title="Tiny-ImageNet-200", files=(source,), extracted_dir="tiny-imagenet-200"
        )
    }
    zipped = load_dataset("tiny_imagenet", path=archive.parent, root=tmp_path / "root", table=table)
    assert bool((zipped.x_train == dataset.x_train).all())
    assert bool((zipped.x_test == dataset.x_test).all())
    assert (archive.parent / "tiny-imagenet-200-32x32-box.npz").is_file()


def triangle_weights(size_in: int, size_out: int) -> np.ndarray:
    """Reference: ``(size_out, size_in)`` antialiased bilinear weights for a reduction.

    Output pixel ``i`` is centred at ``(i + 0.5) * scale`` in input coordinates; input pixel
    ``j`` (centre ``j + 0.5``) weighs ``max(0, 1 - |distance| / scale)``, a triangle of support
    ``scale`` on each side; the weights of pixels inside the image are renormalised to sum 1.
    """
    scale = size_in / size_out
    centres = (np.arange(size_out) + 0.5) * scale
    distance = np.abs(np.arange(size_in) + 0.5 - centres[:, None])
    weights = np.maximum(0.0, 1.0 - distance / scale)
    normalised: np.ndarray = weights / weights.sum(axis=1, keepdims=True)
    return normalised


def bilinear_reference(images: np.ndarray, size: int) -> np.ndarray:
    """``(n, c, h, w)`` -> ``(n, c, size, size)`` float64, separable triangle-filter means."""
    rows = triangle_weights(images.shape[2], size)
    columns = triangle_weights(images.shape[3], size)
    result: np.ndarray = np.einsum("ih,nchw,jw->ncij", rows, images.astype(np.float64), columns)
    return result


def test_factor_two_weights_by_hand() -> None:
    # Interior: 1/8, 3/8, 3/8, 1/8 over 4 pixels; at the border the pixel outside is dropped and
    # 3/4, 3/4, 1/4 renormalise to 3/7, 3/7, 1/7.
    weights = triangle_weights(8, 4)
    assert np.allclose(weights[1, 1:5], [1 / 8, 3 / 8, 3 / 8, 1 / 8])
    assert np.allclose(weights[0, :3], [3 / 7, 3 / 7, 1 / 7])
    assert np.allclose(weights[3, 5:], [1 / 7, 3 / 7, 3 / 7])
    assert np.count_nonzero(weights, axis=1).tolist() == [3, 4, 4, 3]


def test_bilinear_antialias_downsample_matches_the_hand_computation() -> None:
    images = np.random.default_rng(3).integers(0, 256, size=(2, 3, 12, 12), dtype=np.uint8)
    resized = resize_bilinear_antialias(torch.from_numpy(images), 6)
    assert resized.dtype == torch.uint8 and tuple(resized.shape) == (2, 3, 6, 6)
    exact = bilinear_reference(images, 6)
    # Rounded to the nearest integer, except within float32 error of a half (either side).
    near_half = np.abs(exact - np.floor(exact) - 0.5) < 1e-3
    got = resized.numpy().astype(np.float64)
    assert np.array_equal(got[~near_half], np.floor(exact + 0.5)[~near_half])
    assert np.abs(got - exact).max() <= 0.5 + 1e-3
    # Not the 2x2 block mean: the triangle reaches into the neighbouring blocks.
    blocks = images.astype(np.float64).reshape(2, 3, 6, 2, 6, 2).mean(axis=(3, 5))
    assert np.abs(got - blocks).max() > 1


def test_tiny_imagenet_resize_switch(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "tiny-imagenet-200"
    pixels = write_tiny_imagenet(folder, np.random.default_rng(0))
    common: dict[str, Any] = {"path": folder, "root": tmp_path / "root", "table": tiny_table()}
    box = load_dataset("tiny_imagenet", **common)
    explicit_box = load_dataset("tiny_imagenet", resize="box", **common)
    assert bool((explicit_box.x_train == box.x_train).all())
    released = load_dataset("tiny_imagenet", resize="bilinear-antialias", **common)
    # Each filter has its own cache; the box cache keeps its name.
    names = sorted(p.name for p in folder.parent.glob("*.npz"))
    assert names == [
        "tiny-imagenet-200-32x32-bilinear-antialias.npz",
        "tiny-imagenet-200-32x32-box.npz",
    ]
    first = pixels["train/n01/images/n01_0.JPEG"].transpose(2, 0, 1)[None]
    expected = bilinear_reference(first, 32)[0]
    assert np.abs(released.x_train[0].numpy() - expected).max() <= 0.5 + 1e-3
    assert (
        np.abs(box.x_train[0].numpy() - box_reduce(pixels["train/n01/images/n01_0.JPEG"])).max()
        <= 1
    )
    assert not bool((released.x_train == box.x_train).all())
    assert released.y_train.tolist() == box.y_train.tolist()
    # Read back from the caches, neither filter's images leak into the other's.
    again_box = load_dataset("tiny_imagenet", **common)
    again_released = load_dataset("tiny_imagenet", resize="bilinear-antialias", **common)
    assert bool((again_box.x_train == box.x_train).all())
    assert bool((again_released.x_test == released.x_test).all())


def test_unknown_resize_filter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("tiny_imagenet", path=tmp_path, resize="bicubic", table=tiny_table())
    assert one_sentence(str(info.value))
    assert "data.resize must be one of 'box', 'bilinear-antialias'" in str(info.value)


def test_tiny_imagenet_without_pillow_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "tiny-imagenet-200"
    write_tiny_imagenet(folder, np.random.default_rng(1))
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(DataError, match=r'pip install "fedssd\[images\]"'):
        load_dataset("tiny_imagenet", path=folder, root=tmp_path / "root", table=tiny_table())


# ------------------------------------------------------------------------------------- npz


def npz_file(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "own.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def good_npz_arrays(channels: int | None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tail = (28, 28) if channels is None else (28, 28, channels)
    return {
        "x_train": rng.integers(0, 256, size=(5, *tail), dtype=np.uint8),
        "y_train": np.array([0, 3, 1, 1, 2], dtype=np.int32),
        "x_test": rng.integers(0, 256, size=(2, *tail), dtype=np.uint8),
        "y_test": np.array([4, 0], dtype=np.int64),
    }


@pytest.mark.parametrize("channels", [None, 1, 3])
def test_npz_layouts(tmp_path: Path, channels: int | None) -> None:
    arrays = good_npz_arrays(channels)
    path = npz_file(tmp_path, **arrays)
    dataset = load_dataset("npz", path=path, pad_to_32=False, rgb=False)
    stored_channels = 1 if channels is None else channels
    assert dataset.x_train.shape == (5, stored_channels, 28, 28)
    assert dataset.num_classes == 5
    assert dataset.y_train.tolist() == [0, 3, 1, 1, 2]
    assert str(dataset.y_test.dtype) == "torch.int64"
    expected = arrays["x_train"] if channels is None else arrays["x_train"].transpose(0, 3, 1, 2)
    if channels is None:
        expected = expected[:, None]
    np.testing.assert_array_equal(dataset.x_train.numpy(), expected)
    converted = load_dataset("npz", path=path)
    assert converted.x_test.shape == (2, 3, 32, 32)


def _replace(**changes: np.ndarray) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    return lambda arrays: {**arrays, **changes}


def _drop(key: str) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    return lambda arrays: {k: v for k, v in arrays.items() if k != key}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop("y_test"), "has no array 'y_test'"),
        (_replace(x_train=np.zeros((5, 28, 28), np.float32)), "x_train has dtype float32"),
        (_replace(x_test=np.zeros((2, 784), np.uint8)), "x_test has shape"),
        (_replace(x_test=np.zeros((2, 28, 28, 2), np.uint8)), "x_test has shape"),
        (_replace(x_test=np.zeros((2, 30, 30), np.uint8)), "same size and channels"),
        (
            _replace(x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.int64)),
            "holds no images",
        ),
        (_replace(y_train=np.array([0, 1, 2])), "y_train holds 3 labels for 5 images"),
        (_replace(y_test=np.array([0, -1])), "negative label -1"),
        (_replace(y_test=np.array([0.0, 1.0])), "1-D integer array"),
        (_replace(y_train=np.zeros((5, 1), np.int64)), "1-D integer array"),
        (_replace(y_train=np.array([0, 1, None, 2, 3], dtype=object)), "not a plain numeric"),
        (_replace(y_train=np.array([0, 3, 1, 1, 10**9])), "class ids 0..C-1"),
        (_replace(y_train=np.array([0, 3, 1, 1, 2**64 - 1], dtype=np.uint64)), "class ids 0..C-1"),
        # Five training images allow at most five classes, 0..4.
        (_replace(y_test=np.array([5, 0])), "class ids 0..C-1"),
    ],
)
def test_bad_npz_is_refused(
    tmp_path: Path,
    change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    message: str,
) -> None:
    path = npz_file(tmp_path, **change(good_npz_arrays(None)))
    with pytest.raises(DataError, match=message) as caught:
        load_dataset("npz", path=path)
    assert one_sentence(str(caught.value))
    assert "allow_pickle" not in str(caught.value)


def test_npz_needs_a_readable_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"needs data\.path"):
        load_dataset("npz")
    with pytest.raises(DataError, match="is not a file"):
        load_dataset("npz", path=tmp_path / "absent.npz")


def _write_text(path: Path) -> None:
    path.write_text("hello")


def _write_npy(path: Path) -> None:
    with path.open("wb") as out:
        np.save(out, np.zeros(3))


def _write_truncated(path: Path) -> None:
    np.savez(path, **good_npz_arrays(None))  # type: ignore[arg-type]
    path.write_bytes(path.read_bytes()[:200])


def _write_flipped_byte(path: Path) -> None:
    np.savez(path, **good_npz_arrays(None))  # type: ignore[arg-type]
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside the first member's stored bytes, so its CRC-32 fails
    path.write_bytes(bytes(data))


def _write_bad_header(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            archive.writestr(f"{key}.npy", b"\x93NUMPY\x01\x00\x10\x00{garbage}      \n")


def _write_huge_shape(path: Path) -> None:
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (10000000000000,), }"
    header = header.ljust(117) + b"\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"abc"
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            archive.writestr(f"{key}.npy", member)


def _write_raw_members(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            archive.writestr(key, b"not an array")


def _write_empty_archive(path: Path) -> None:
    zipfile.ZipFile(path, "w").close()


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_write_text, r"not an \.npz archive"),
        (_write_npy, r"not an \.npz archive"),
        (_write_truncated, r"damaged \.npz archive"),
        (_write_flipped_byte, r"damaged \.npz archive"),
        (_write_bad_header, "not a plain numeric"),
        # 10 TB: refused by the allocator, or (with unlimited overcommit) the data runs out.
        (_write_huge_shape, "too large for this machine's memory|not a plain numeric"),
        (_write_raw_members, r"x_train is not a \.npy array"),
        (_write_empty_archive, "has no array 'x_train'"),
    ],
)
def test_unreadable_npz_gives_one_sentence_without_numpy_advice(
    tmp_path: Path, write: Callable[[Path], None], message: str
) -> None:
    path = tmp_path / "own.npz"
    write(path)
    with pytest.raises(DataError, match=message) as caught:
        load_dataset("npz", path=path)
    assert one_sentence(str(caught.value))
    assert "allow_pickle" not in str(caught.value)


# ------------------------------------------------------------------- real Fashion-MNIST


def test_real_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(
            f"Fashion-MNIST is not installed in {DEBIAN_FASHION}; run `make data` "
            "(it installs the Debian package dataset-fashion-mnist)."
        )
    logs: list[str] = []
    dataset = load_dataset("fashion_mnist", root=tmp_path, download=False, log=logs.append)
    assert logs == [f"Fashion-MNIST: using {DEBIAN_FASHION}"]
    assert isinstance(dataset, ImageDataset)
    assert dataset.x_train.shape == (60_000, 3, 32, 32)
    assert dataset.x_test.shape == (10_000, 3, 32, 32)
    assert dataset.num_classes == 10
    assert dataset.y_train.bincount().tolist() == [6000] * 10
    assert dataset.y_test.bincount().tolist() == [1000] * 10
    # Pinned facts of the official files: the first images are an ankle boot (9) in both sets.
    assert dataset.y_train[:5].tolist() == [9, 0, 0, 3, 0]
    assert dataset.y_test[:5].tolist() == [9, 2, 1, 1, 6]
    assert int(dataset.x_train[0, 0].sum()) == 228741 // 3
    assert not dataset.x_train[:, :, :2].any()
    # The Debian files were verified through their content digest and that is remembered.
    assert (tmp_path / "verified.json").is_file()


def test_missing_explicit_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist; point it at a folder holding") as caught:
        load_dataset("mnist", path=tmp_path / "nowhere", root=tmp_path / "root")
    assert one_sentence(str(caught.value))
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz or its extracted"):
        load_dataset("cifar10", path=tmp_path / "nowhere", root=tmp_path / "root")


# ------------------------------------------------------------------------ shared helpers


def test_log_helpers_are_shared_with_fetch() -> None:
    # One definition, in the lower module: datasets must reuse fetch's, not redefine them.
    imported = vars(datasets_module)
    assert imported["_silent"] is fetch_module._silent
    assert imported["Log"] is fetch_module.Log
    assert imported["_GZIP_MAGIC"] is fetch_module._GZIP_MAGIC
