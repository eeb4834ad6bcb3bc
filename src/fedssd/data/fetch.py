"""Official dataset sources, checksum verification and verified downloads.

The table :data:`CHECKSUMS` lists, per dataset, the official files with their URLs and published
MD5 digests. A local file is accepted when its MD5 matches, or, where the table knows it, when the
SHA-256 of its decompressed content matches: Debian's ``dataset-fashion-mnist`` package ships the
official Fashion-MNIST files recompressed, so their archive MD5 differs while the images are
identical. Downloads go to a temporary file next to their destination and are moved into place
(``os.replace``) only after their MD5 matched, so a failed or corrupt download never leaves a file
that looks usable.

Hashing a file happens once: a successful verification is remembered in ``verified.json`` in the
data root, keyed by the file's absolute path, size and modification time (the same rule make and
rsync use to decide a file is unchanged). The record lives in the data root, never next to the
files it describes, so read-only or package-owned places such as ``/usr/share`` stay untouched.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import IO

from fedssd.errors import DataError

__all__ = [
    "CHECKSUMS",
    "RECORD_NAME",
    "DatasetSources",
    "Source",
    "default_root",
    "download",
    "fetch_sources",
    "file_md5",
    "missing_advice",
    "temporary_sibling",
    "verify_file",
]

Log = Callable[[str], None]
"""Receives one progress or decision line."""

RECORD_NAME = "verified.json"
_CHUNK = 1 << 20
_PROGRESS_EVERY = 8 << 20
_TIMEOUT_S = 60.0
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Source:
    """One official file of a dataset.

    Attributes:
        filename: The file's official name, e.g. ``"train-images-idx3-ubyte.gz"``.
        urls: Where to download it, tried in order.
        md5: The published MD5 of the file as distributed.
        content_sha256: SHA-256 of the decompressed content of a ``.gz`` file, or ``None``.
    """

    filename: str
    urls: tuple[str, ...]
    md5: str
    content_sha256: str | None = None


@dataclass(frozen=True)
class DatasetSources:
    """Everything needed to find, verify and download one dataset.

    Attributes:
        title: Human-readable name used in messages, e.g. ``"Fashion-MNIST"``.
        files: The official files.
        extracted_dir: Name of the folder inside the archive (``None`` for loose files).
        extracted_md5: ``(relative path, md5)`` of files in the extracted folder that can be
            checked; empty where the folder holds too many files to list (Tiny-ImageNet).
        system_folder: Where an operating-system package installs the files, if any.
        install_hint: The command that installs that package, if any.
    """

    title: str
    files: tuple[Source, ...]
    extracted_dir: str | None = None
    extracted_md5: tuple[tuple[str, str], ...] = ()
    system_folder: str | None = None
    install_hint: str | None = None


def _idx_sources(
    base_urls: tuple[str, ...], digests: Mapping[str, tuple[str, str | None]]
) -> tuple[Source, ...]:
    return tuple(
        Source(
            filename=name,
            urls=tuple(base + name for base in base_urls),
            md5=md5,
            content_sha256=content,
        )
        for name, (md5, content) in digests.items()
    )


# Zalando's release bucket, the address the fashion-mnist README links to; MD5s as published there.
# The content SHA-256s were measured on the decompressed files (Debian's bytes equal the official).
_FASHION_MNIST = DatasetSources(
    title="Fashion-MNIST",
    files=_idx_sources(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            "train-labels-idx1-ubyte.gz": (
                "25c81989df183df01b3e8a0aad5dffbe",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            "t10k-images-idx3-ubyte.gz": (
                "bef4ecab320f06d8554ea6380940ec79",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "bb300cfdad3c16e7a12a480ee83cd310",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        },
    ),
    system_folder="/usr/share/datasets/fashion-mnist",
    install_hint="apt-get install dataset-fashion-mnist",
)

# yann.lecun.com no longer serves the files reliably; PyTorch's ossci-datasets mirror holds the
# original archives (same MD5s as LeCun's page).
_MNIST = DatasetSources(
    title="MNIST",
    files=_idx_sources(
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        {
            "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", None),
            "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432", None),
            "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3", None),
            "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c", None),
        },
    ),
)

# www.cs.toronto.edu/~kriz now redirects to cave.cs.toronto.edu/kriz; both are listed so a broken
# redirect does not stop a download. Member MD5s let an already-extracted folder be verified.
_CIFAR10 = DatasetSources(
    title="CIFAR-10",
    files=(
        Source(
            filename="cifar-10-python.tar.gz",
            urls=(
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "https://cave.cs.toronto.edu/kriz/cifar-10-python.tar.gz",
            ),
            md5="c58f30108f718f92721af3b95e74349a",
        ),
    ),
    extracted_dir="cifar-10-batches-py",
    extracted_md5=(
        ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ("test_batch", "40351d587109b95175f43aff81a1287e"),
    ),
)

_CIFAR100 = DatasetSources(
    title="CIFAR-100",
    files=(
        Source(
            filename="cifar-100-python.tar.gz",
            urls=(
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "https://cave.cs.toronto.edu/kriz/cifar-100-python.tar.gz",
            ),
            md5="eb9058c3a382ffc7106e4002c42a8d85",
        ),
    ),
    extracted_dir="cifar-100-python",
    extracted_md5=(
        ("train", "16019d7e3df5f24257cddd939b257f8d"),
        ("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
    ),
)

_TINY_IMAGENET = DatasetSources(
    title="Tiny-ImageNet-200",
    files=(
        Source(
            filename="tiny-imagenet-200.zip",
            urls=("http://cs231n.stanford.edu/tiny-imagenet-200.zip",),
            md5="90528d7ca1a48142e341f4ef8d21d0de",
        ),
    ),
    extracted_dir="tiny-imagenet-200",
)

CHECKSUMS: Mapping[str, DatasetSources] = MappingProxyType(
    {
        "fashion_mnist": _FASHION_MNIST,
        "mnist": _MNIST,
        "cifar10": _CIFAR10,
        "cifar100": _CIFAR100,
        "tiny_imagenet": _TINY_IMAGENET,
    }
)
"""Official sources and digests per dataset name (read-only)."""


def default_root() -> Path:
    """The data root: ``$FEDSSD_DATA`` if set, else ``~/.cache/fedssd``."""
    configured = os.environ.get("FEDSSD_DATA")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "fedssd"


def missing_advice(entry: DatasetSources, folder: Path) -> str:
    """The clause of an error message that says how to make ``entry`` available.

    Args:
        entry: The dataset's sources.
        folder: The folder under the data root where fedssd looks for the files.

    Returns:
        E.g. ``"install it with `apt-get install ...`, or put a.gz and b.gz in /root/x, or set
        data.path to a folder holding them"`` (no capital, no final full stop).
    """
    names = [source.filename for source in entry.files]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    them = "it" if len(names) == 1 else "them"
    where = f"put {listed} in {folder}, or set data.path to a folder holding {them}"
    if entry.install_hint is not None:
        return f"install it with `{entry.install_hint}`, or {where}"
    return where


def _read_record(record: Path) -> dict[str, dict[str, object]]:
    try:
        loaded = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = loaded.get("files") if isinstance(loaded, dict) else None
    return files if isinstance(files, dict) else {}


def _write_record(record: Path, files: Mapping[str, Mapping[str, object]]) -> None:
    # Best effort: a data root we cannot write to only costs a re-hash next time.
    temp = temporary_sibling(record)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        with temp.open("x", encoding="utf-8") as out:
            json.dump({"files": dict(files)}, out, indent=1, sort_keys=True)
        os.replace(temp, record)
    except OSError:
        temp.unlink(missing_ok=True)


def _fingerprint(path: Path, expected_md5: str) -> tuple[str, dict[str, object]]:
    stat = path.stat()
    key = str(path.resolve())
    return key, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "md5": expected_md5}


def file_md5(path: Path) -> str:
    """The MD5 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _content_sha256(path: Path) -> str | None:
    """SHA-256 of the file's content, decompressed first if it is gzip; ``None`` if unreadable."""
    with path.open("rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def verify_file(
    path: Path,
    *,
    md5: str,
    content_sha256: str | None = None,
    record: Path | None = None,
) -> bool:
    """Whether a local file is the official one.

    A file passes if its MD5 is ``md5`` or, when ``content_sha256`` is given, if the SHA-256 of its
    (gunzipped, where it is gzip) content is ``content_sha256``. A pass is remembered in
    ``record`` keyed by absolute path, size and modification time, so an unchanged file is not
    hashed again.

    Args:
        path: The file to check.
        md5: Expected MD5 of the file as distributed.
        content_sha256: Expected SHA-256 of the decompressed content, if known.
        record: The ``verified.json`` to consult and update, or ``None`` to always hash.

    Returns:
        ``True`` if the file matches, ``False`` if it is missing or does not match.
    """
    if not path.is_file():
        return False
    key, fingerprint = _fingerprint(path, md5)
    known = _read_record(record) if record is not None else {}
    if known.get(key) == fingerprint:
        return True
    try:
        matches = file_md5(path) == md5 or (
            content_sha256 is not None and _content_sha256(path) == content_sha256
        )
    except OSError as error:
        raise DataError(f"Cannot read {path} ({error.strerror}); check its permissions.") from error
    if matches and record is not None:
        # Re-read so that verifications made meanwhile by another process are kept.
        _write_record(record, {**_read_record(record), key: fingerprint})
    return matches


def _copy_with_progress(
    response: IO[bytes],
    out: IO[bytes],
    *,
    name: str,
    total: str | None,
    log: Log,
) -> str:
    """Stream ``response`` into ``out``, logging every few MiB; return the written bytes' MD5."""
    of_total = f" of {int(total) / 2**20:.1f} MiB" if total and total.isdigit() else ""
    digest = hashlib.md5(usedforsecurity=False)
    done = 0
    next_report = _PROGRESS_EVERY
    for chunk in iter(lambda: response.read(_CHUNK), b""):
        out.write(chunk)
        digest.update(chunk)
        done += len(chunk)
        if done >= next_report:
            log(f"{name}: {done / 2**20:.1f} MiB{of_total}")
            next_report += _PROGRESS_EVERY
    return digest.hexdigest()


def download(
    source: Source,
    folder: Path,
    *,
    record: Path | None = None,
    log: Log | None = None,
    advice: str | None = None,
) -> Path:
    """Download one official file into ``folder`` and return its path, verified.

    The bytes go to a temporary file in ``folder``; only when their MD5 equals ``source.md5`` is
    the file moved to ``folder / source.filename``. URLs are tried in order while they fail with
    network errors; a wrong digest stops at once, since it means the source changed.

    Args:
        source: What to download.
        folder: Destination folder (created if missing).
        record: The ``verified.json`` to note the new file in.
        log: Receives progress lines.
        advice: What to tell the user if every URL fails (default: where to put the file).

    Returns:
        The path of the verified file.

    Raises:
        DataError: Every URL failed, or the downloaded bytes have the wrong MD5 (the partial
            file is deleted in both cases).
    """
    say = log if log is not None else _silent
    target = folder / source.filename
    problems: list[str] = []
    for url in source.urls:
        say(f"Downloading {url}")
        temp = _temporary_file(folder, source.filename)
        # The finally clause removes the partial file on every way out, Ctrl-C included.
        try:
            try:
                with (
                    temp.open("wb") as out,
                    urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response,
                ):
                    total = response.headers.get("Content-Length")
                    actual = _copy_with_progress(
                        response, out, name=source.filename, total=total, log=say
                    )
            except (OSError, ValueError) as error:
                reason = error.reason if isinstance(error, urllib.error.URLError) else error
                problems.append(f"{url}: {reason}")
                continue
            if actual != source.md5:
                raise DataError(
                    f"The download of {source.filename} from {url} has MD5 {actual} instead of "
                    f"the official {source.md5}, so it was deleted; try again later or put a "
                    f"verified copy in {folder}."
                )
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)
        say(f"{source.filename}: MD5 verified, saved to {target}")
        if record is not None:
            key, fingerprint = _fingerprint(target, source.md5)
            _write_record(record, {**_read_record(record), key: fingerprint})
        return target
    where = (
        advice if advice is not None else f"put a verified copy of {source.filename} in {folder}"
    )
    raise DataError(f"Could not download {source.filename} ({'; '.join(problems)}); {where}.")


def temporary_sibling(target: Path) -> Path:
    """An unused hidden path next to ``target``, to write it whole and then ``os.replace`` it.

    Unlike ``tempfile.mkstemp`` (mode 0600), a file created there with ``open(..., "x")``
    gets the usual permissions, so a shared data root stays readable by its other users.
    """
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")


def _temporary_file(folder: Path, filename: str) -> Path:
    """An empty hidden file in ``folder`` to download into (same file system as the target)."""
    temp = temporary_sibling(folder / filename)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temp.open("xb").close()
    except OSError as error:
        raise DataError(
            f"Cannot write to the data folder {folder} ({error.strerror}); set data.root to a "
            "writable folder."
        ) from error
    return temp


def fetch_sources(
    entry: DatasetSources,
    folder: Path,
    *,
    record: Path | None = None,
    log: Log | None = None,
) -> None:
    """Make every file of ``entry`` present and verified in ``folder``, downloading what is not.

    Args:
        entry: The dataset's sources.
        folder: Destination folder.
        record: The ``verified.json`` of the data root.
        log: Receives progress lines.

    Raises:
        DataError: A download failed; the message says how else to provide the files.
    """
    advice = missing_advice(entry, folder)
    for source in entry.files:
        existing = folder / source.filename
        if verify_file(
            existing, md5=source.md5, content_sha256=source.content_sha256, record=record
        ):
            continue
        if existing.exists() and log is not None:
            log(f"{existing} does not match its official checksum; downloading it again")
        download(source, folder, record=record, log=log, advice=advice)


def _silent(message: str) -> None:
    """Discard a progress line (the default when no ``log`` is given)."""
