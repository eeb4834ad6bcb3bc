"""Verified downloads through file:// URLs, checksum rules and the verification record."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from fedssd.data.datasets import fetch_dataset, load_dataset
from fedssd.data.fetch import (
    CHECKSUMS,
    DatasetSources,
    Source,
    download,
    fetch_sources,
    verify_file,
)
from fedssd.errors import DataError
from helpers import one_sentence

IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def md5_of(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def served(tmp_path: Path, name: str, data: bytes) -> str:
    """Put ``data`` in a 'server' folder and return its file:// URL."""
    server = tmp_path / "server"
    server.mkdir(exist_ok=True)
    (server / name).write_bytes(data)
    return (server / name).as_uri()


# ----------------------------------------------------------------------------- the table


def test_real_table_has_the_published_digests() -> None:
    digests = {
        name: [(s.filename, s.md5) for s in entry.files] for name, entry in CHECKSUMS.items()
    }
    assert digests["cifar10"] == [("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")]
    assert digests["cifar100"] == [("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85")]
    assert digests["tiny_imagenet"] == [
        ("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de")
    ]
    assert dict(digests["fashion_mnist"])["train-images-idx3-ubyte.gz"] == (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    )
    assert dict(digests["mnist"])["t10k-labels-idx1-ubyte.gz"] == "ec29112dd5afa0611ce80d1b7f02629c"
    for entry in CHECKSUMS.values():
        for source in entry.files:
            assert len(source.md5) == 32
            assert source.urls
            assert all(url.endswith(source.filename) for url in source.urls)
    assert all(s.content_sha256 for s in CHECKSUMS["fashion_mnist"].files)
    with pytest.raises(TypeError):
        CHECKSUMS["x"] = CHECKSUMS["mnist"]  # type: ignore[index]


# ------------------------------------------------------------------------------ verifying


def test_verify_accepts_md5_or_content_digest(tmp_path: Path) -> None:
    content = bytes(range(256)) * 40
    official = gzip.compress(content, compresslevel=9, mtime=1)
    recompressed = gzip.compress(content, compresslevel=1, mtime=2)
    assert md5_of(official) != md5_of(recompressed)
    (tmp_path / "a.gz").write_bytes(recompressed)
    sha = hashlib.sha256(content).hexdigest()
    assert verify_file(tmp_path / "a.gz", md5=md5_of(recompressed))
    assert not verify_file(tmp_path / "a.gz", md5=md5_of(official))
    # Debian's case: other compression, same content.
    assert verify_file(tmp_path / "a.gz", md5=md5_of(official), content_sha256=sha)
    (tmp_path / "plain").write_bytes(content)
    assert verify_file(tmp_path / "plain", md5=md5_of(official), content_sha256=sha)
    (tmp_path / "b.gz").write_bytes(gzip.compress(content[:-1] + b"!", mtime=0))
    assert not verify_file(tmp_path / "b.gz", md5=md5_of(official), content_sha256=sha)
    (tmp_path / "broken.gz").write_bytes(recompressed[:-30])
    assert not verify_file(tmp_path / "broken.gz", md5=md5_of(official), content_sha256=sha)
    assert not verify_file(tmp_path / "absent.gz", md5=md5_of(official), content_sha256=sha)


def test_verification_is_remembered_by_size_and_mtime(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    target.write_bytes(b"official bytes")
    record = tmp_path / "root" / "verified.json"
    good = md5_of(b"official bytes")
    assert verify_file(target, md5=good, record=record)
    stored = json.loads(record.read_text())["files"][str(target.resolve())]
    assert stored["md5"] == good
    assert stored["size"] == len(b"official bytes")
    # Same size and mtime: the record is trusted and the file is not hashed again.
    stamp = target.stat().st_mtime_ns
    target.write_bytes(b"tampered bytes")
    os.utime(target, ns=(stamp, stamp))
    assert verify_file(target, md5=good, record=record)
    # A changed mtime sends it back to hashing, which now fails.
    os.utime(target, ns=(stamp + 10**9, stamp + 10**9))
    assert not verify_file(target, md5=good, record=record)
    # A record for another expected digest does not count either.
    target.write_bytes(b"official bytes")
    assert verify_file(target, md5=good, record=record)
    assert not verify_file(target, md5=md5_of(b"other"), record=record)


# ------------------------------------------------------------------------------ downloads


def test_download_good_file(tmp_path: Path) -> None:
    data = os.urandom(9 << 20)
    source = Source(
        filename="blob.bin", urls=(served(tmp_path, "blob.bin", data),), md5=md5_of(data)
    )
    logs: list[str] = []
    record = tmp_path / "root" / "verified.json"
    target = download(source, tmp_path / "root" / "x", record=record, log=logs.append)
    assert target == tmp_path / "root" / "x" / "blob.bin"
    assert target.read_bytes() == data
    assert leftovers(target.parent) == []
    assert any("8.0 MiB of 9.0 MiB" in line for line in logs)
    assert str(target.resolve()) in json.loads(record.read_text())["files"]
    # Created like any other file (umask), not 0600 as tempfile.mkstemp would leave it.
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_corrupt_download_is_refused_and_removed(tmp_path: Path) -> None:
    data = b"the server sent these bytes"
    expected = md5_of(b"the official bytes")
    source = Source(filename="blob.bin", urls=(served(tmp_path, "blob.bin", data),), md5=expected)
    folder = tmp_path / "root"
    with pytest.raises(DataError) as caught:
        download(source, folder)
    message = str(caught.value)
    assert "blob.bin" in message
    assert expected in message
    assert md5_of(data) in message
    assert one_sentence(message)
    assert not (folder / "blob.bin").exists()
    assert leftovers(folder) == []


def test_corrupt_download_does_not_replace_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "root"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(b"previous")
    source = Source(filename="blob.bin", urls=(served(tmp_path, "blob.bin", b"bad"),), md5="0" * 32)
    with pytest.raises(DataError):
        download(source, folder)
    assert (folder / "blob.bin").read_bytes() == b"previous"


def test_unreachable_source_gives_one_sentence_with_advice(tmp_path: Path) -> None:
    missing = (tmp_path / "server" / "nothing.bin").as_uri()
    source = Source(filename="nothing.bin", urls=(missing,), md5="0" * 32)
    with pytest.raises(DataError) as caught:
        download(source, tmp_path / "root", advice="put nothing.bin in the root")
    message = str(caught.value)
    assert message.startswith("Could not download nothing.bin (")
    assert message.endswith("; put nothing.bin in the root.")
    assert one_sentence(message)
    assert leftovers(tmp_path / "root") == []


def test_next_url_is_tried_after_a_network_error(tmp_path: Path) -> None:
    data = b"payload"
    dead = (tmp_path / "gone" / "p.bin").as_uri()
    source = Source(
        filename="p.bin", urls=(dead, served(tmp_path, "p.bin", data)), md5=md5_of(data)
    )
    assert download(source, tmp_path / "root").read_bytes() == data


# ---------------------------------------------------------- whole datasets via the table


def idx_gz(array: np.ndarray) -> bytes:
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.tobytes(), mtime=0)


def served_idx_table(
    tmp_path: Path, *, install_hint: str | None = None
) -> Mapping[str, DatasetSources]:
    rng = np.random.default_rng(0)
    arrays = (
        rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8),
        np.array([1, 2, 3, 4], dtype=np.uint8),
        rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8),
        np.array([5, 6], dtype=np.uint8),
    )
    files = []
    for stem, array in zip(IDX_STEMS, arrays, strict=True):
        data = idx_gz(array)
        url = served(tmp_path, f"{stem}.gz", data)
        files.append(Source(filename=f"{stem}.gz", urls=(url,), md5=md5_of(data)))
    entry = DatasetSources(title="Served IDX", files=tuple(files), install_hint=install_hint)
    return {"fashion_mnist": entry}


def test_load_dataset_downloads_verifies_and_reuses(tmp_path: Path) -> None:
    table = served_idx_table(tmp_path)
    root = tmp_path / "root"
    logs: list[str] = []
    dataset = load_dataset("fashion_mnist", root=root, table=table, log=logs.append)
    assert dataset.y_train.tolist() == [1, 2, 3, 4]
    assert dataset.x_test.shape == (2, 3, 32, 32)
    assert sum(line.startswith("Downloading file://") for line in logs) == 4
    assert sorted(p.name for p in (root / "fashion_mnist").iterdir()) == [
        f"{s}.gz" for s in sorted(IDX_STEMS)
    ]
    logs.clear()
    load_dataset("fashion_mnist", root=root, table=table, log=logs.append)
    assert logs == [f"Served IDX: using {root / 'fashion_mnist'}"]


def test_fetch_replaces_a_corrupt_local_file(tmp_path: Path) -> None:
    table = served_idx_table(tmp_path)
    root = tmp_path / "root"
    location = fetch_dataset("fashion_mnist", root=root, table=table)
    assert location == root / "fashion_mnist"
    damaged = location / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(b"junk")
    logs: list[str] = []
    fetch_dataset("fashion_mnist", root=root, table=table, log=logs.append)
    assert md5_of(damaged.read_bytes()) == table["fashion_mnist"].files[3].md5
    assert any("does not match its official checksum" in line for line in logs)


def test_fetch_keeps_verified_files_without_network(tmp_path: Path) -> None:
    table = served_idx_table(tmp_path)
    folder = tmp_path / "root" / "fashion_mnist"
    fetch_sources(table["fashion_mnist"], folder)
    for path in (tmp_path / "server").iterdir():
        path.unlink()
    fetch_sources(table["fashion_mnist"], folder)
    assert len(list(folder.glob("*.gz"))) == 4


def test_failed_download_says_what_to_install_and_where(tmp_path: Path) -> None:
    table = served_idx_table(tmp_path, install_hint="apt-get install dataset-fashion-mnist")
    for path in (tmp_path / "server").iterdir():
        path.unlink()
    root = tmp_path / "root"
    with pytest.raises(DataError) as caught:
        load_dataset("fashion_mnist", root=root, table=table)
    message = str(caught.value)
    assert one_sentence(message)
    assert message.startswith("Could not download train-images-idx3-ubyte.gz (")
    assert "install it with `apt-get install dataset-fashion-mnist`" in message
    assert str(root / "fashion_mnist") in message
    assert all(f"{stem}.gz" in message for stem in IDX_STEMS)
    assert "set data.path" in message
    assert leftovers(root / "fashion_mnist") == []
