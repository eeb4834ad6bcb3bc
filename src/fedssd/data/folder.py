"""Your own images: a folder (or a tar archive of one) of PNG/JPEG files, decoded once into a
verified cache.

Layout. The images sit either directly in the folder (no labels), in one subfolder per class
(labels), or in ``train/`` and ``test/`` subfolders that each hold one subfolder per class: the
usual layout of an image dataset with its official test split, read as that dataset (the images
of ``train/`` are the training set, those of ``test/`` the test set) and not as two classes. Both
splits must have the same class subfolders. Classes are numbered in the sorted order of the
subfolder names, and the names are kept; an image in a deeper folder inside a class subfolder
belongs to that class. Layouts that could be misread are refused with one sentence: loose images
beside subfolders, and any folder with a subfolder named like a split (``train``, ``test``,
``val``, ``valid``, ``validation``) that is not exactly ``train/<class>/`` and ``test/<class>/``
(``train/`` without ``test/``, a third subfolder beside them, images directly in ``train/`` or
``test/``), since it cannot be told from a folder whose classes have those names. Hidden files
and folders (names starting with ``.``) and files of other types are ignored. The dataset's
order is the sorted order of the paths within each class, classes in label order, the training
split before the test split.

Archives. The path may also be a tar archive (``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``,
``.tar.xz``) of such a folder, read as the folder it unpacks to; when everything in it sits in
one top-level folder that holds no image itself (``tar czf photos.tar.gz photos/``), as that
folder. Its images are decoded straight from the archive's members into the cache: nothing is
unpacked to disk. Members other than regular files (links, devices) are ignored.

Decoding. Every image is converted to RGB (``rgb = true``; grayscale is repeated to 3 channels)
or to one luma channel ``L`` (``rgb = false``; ITU-R 601-2 weights), with its EXIF orientation
applied. Palette, CMYK and two-level images are converted by Pillow; an alpha channel is
composited onto black; 16-bit grayscale is scaled to 8 bits (``value // 257``). The image is then
resized so that its shorter side is ``image_size`` (Pillow's BICUBIC filter, whose support grows
with the reduction factor, so shrinking is antialiased) and centre-cropped to ``image_size`` x
``image_size``.

Cache. The decoded uint8 array ``(n, channels, size, size)`` and the labels are saved as ``.npy``
files (``numpy.load(..., mmap_mode="r")`` maps them without reading) with a JSON manifest that
holds the source's signature and the SHA-256 of both ``.npy`` files. The signature of a folder
is every file's relative path, size and modification time, that of an archive its size and
modification time; both include the image size, the channel mode and the decoder version. A
folder's cache lives in ``<folder>/.fedssd-cache/``, or, when the folder cannot be written, in
``<root>/folder-cache/<hash of the folder's path>/`` (root: ``data.root``, else
``$FEDSSD_DATA``, else ``~/.cache/fedssd``). An archive's cache lives only in
``<root>/folder-cache/<hash of the archive's path>/``: nothing is written beside an archive,
which often sits in a shared or read-only folder. A cache whose signature or digests do not
match is decoded again (with a log line); files are written to temporary names and renamed, the
manifest last, so an interrupted write leaves either the old cache or none. When no place can
be written, the images are decoded again on every read (with a log line). Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import numpy as np

from fedssd.data.fetch import Log, _silent, default_root, temporary_sibling
from fedssd.errors import DataError

__all__ = [
    "ARCHIVE_SUFFIXES",
    "CACHE_DIR",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "FolderImages",
    "FolderLayout",
    "decode_image",
    "is_archive",
    "read_image_folder",
    "scan_folder",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CACHE_DIR = ".fedssd-cache"
SPLITS = ("train", "test")
# Subfolder names that stand for a split in common datasets: a folder with any of them must have
# exactly the train/ + test/ layout, never be read as a folder of classes.
_SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation"})
# Bumped whenever decoding or labelling changes, so that caches made by another version are
# rebuilt (2: train/ and test/ subfolders are the dataset's splits, no longer two classes).
_DECODER_VERSION = 2
_HASH_CHUNK = 1 << 22
_PROGRESS_EVERY = 10_000
# How many names a message lists before it says how many more there are.
_LISTED = 4


@dataclass(frozen=True)
class FolderImages:
    """A decoded image folder.

    Attributes:
        images: ``(n, channels, size, size)`` uint8 (read-only when mapped from the cache).
        labels: ``(n,)`` int64 class ids, or -1 for every image of an unlabelled folder.
        class_names: The class subfolders in label order; empty when unlabelled.
        files: The images' paths relative to the folder, in dataset order.
        num_test: How many of the images, the last ones, are the test split (a folder with
            ``train/`` and ``test/``); 0 when the folder has no test split.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    files: tuple[str, ...]
    num_test: int = 0

    @property
    def labelled(self) -> bool:
        """Whether the images came with class labels (one subfolder per class)."""
        return bool(self.class_names)


@dataclass(frozen=True)
class FolderLayout:
    """What a folder's file names say, before any image is decoded.

    Attributes:
        files: The images' paths relative to the folder, in dataset order (the training split
            first, then the test split).
        labels: ``(n,)`` int64 class ids, or -1 for every image of an unlabelled folder.
        class_names: The class subfolders in label order; empty when unlabelled.
        num_test: How many of the images, the last ones, are the test split.
    """

    files: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    num_test: int


# (relative path, size in bytes, modification time)
_Entry = tuple[str, int, int]


def is_archive(path: Path) -> bool:
    """Whether ``path`` is named like a tar archive (:data:`ARCHIVE_SUFFIXES`)."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _walk(folder: Path) -> list[_Entry]:
    """Every image file below ``folder`` outside hidden folders: ``(relative path, size,
    mtime_ns)``, from one pass of ``os.scandir`` (one stat per file)."""
    found: list[_Entry] = []
    pending = [("", folder)]
    # Symbolic links to folders are followed, each real folder once (a link loop ends).
    seen = {os.path.realpath(folder)}
    while pending:
        prefix, place = pending.pop()
        with os.scandir(place) as listing:
            for entry in listing:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    real = os.path.realpath(entry.path)
                    if real not in seen:
                        seen.add(real)
                        pending.append((f"{prefix}{entry.name}/", Path(entry.path)))
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                    stat = entry.stat()
                    found.append((prefix + entry.name, stat.st_size, stat.st_mtime_ns))
    return found


def _folder_entries(folder: Path) -> list[_Entry]:
    if not folder.is_dir():
        raise DataError(
            f"{folder} is not a folder; point it at a folder of PNG or JPEG images, or at a tar "
            "archive of one (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)."
        )
    try:
        return _walk(folder)
    except OSError as error:
        raise DataError(
            f"Cannot list {error.filename or folder} ({error.strerror}); check its permissions."
        ) from error


def _member_name(member: tarfile.TarInfo) -> str | None:
    """An archive member's path if it is an image file outside hidden folders, else None."""
    if not member.isfile():
        return None
    parts = [part for part in member.name.split("/") if part not in ("", ".")]
    if not parts or any(part.startswith(".") for part in parts):
        return None
    if os.path.splitext(parts[-1])[1].lower() not in IMAGE_SUFFIXES:
        return None
    return "/".join(parts)


def _archive_error(archive: Path, error: BaseException) -> DataError:
    return DataError(
        f"{archive} cannot be read as a tar archive ({type(error).__name__}: {error}); replace "
        "it, or give the folder it unpacks to."
    )


# What a damaged or truncated tar, gzip, bzip2 or xz stream raises.
_ARCHIVE_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error)


def _archive_entries(archive: Path) -> tuple[list[_Entry], str]:
    """The image members of an archive as ``(path, size, mtime)``, relative to the folder it
    unpacks to, and that folder's prefix within the archive (``""`` or ``"name/"``).

    A member that appears twice counts once, with its last copy (as unpacking would leave it).
    """
    found: dict[str, _Entry] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = _member_name(member)
                if name is not None:
                    found[name] = (name, int(member.size), int(member.mtime))
    except _ARCHIVE_ERRORS as error:
        raise _archive_error(archive, error) from error
    entries = list(found.values())
    tops = {entry[0].split("/", 1)[0] for entry in entries}
    if len(tops) == 1 and all(entry[0].count("/") >= 2 for entry in entries):
        (top,) = tops
        if top not in _SPLIT_NAMES:
            cut = len(top) + 1
            return [(e[0][cut:], e[1], e[2]) for e in entries], f"{top}/"
    return entries, ""


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(f"{name}/" for name in names[:_LISTED])
    more = len(names) - _LISTED
    return shown if more <= 0 else f"{shown} and {more} more"


def _by_class(entries: list[_Entry]) -> tuple[list[_Entry], tuple[str, ...]]:
    """Entries ``class/...`` sorted by class, then by the path within the class (not by the
    joined path, in which a class ``a-b`` would sort before ``a``), and the sorted classes."""
    ordered = sorted(entries, key=lambda e: tuple(e[0].split("/", 1)))
    return ordered, tuple(sorted({e[0].split("/", 1)[0] for e in entries}))


def _layout(entries: list[_Entry], where: str) -> tuple[list[_Entry], FolderLayout]:
    """The dataset order and the labels that the file names give (see the module docstring).

    Raises:
        DataError: No images, or a layout that could be misread.
    """
    loose = sorted(e for e in entries if "/" not in e[0])
    nested = [e for e in entries if "/" in e[0]]
    if loose and nested:
        raise DataError(
            f"{where} holds both images ({loose[0][0]}) and class subfolders "
            f"({nested[0][0].split('/')[0]}); put every image in a class subfolder (labelled) or "
            "all of them directly in the folder (unlabelled)."
        )
    if loose:
        unlabelled = np.full(len(loose), -1, dtype=np.int64)
        return loose, FolderLayout(tuple(e[0] for e in loose), unlabelled, (), 0)
    if not nested:
        raise DataError(
            f"{where} holds no PNG or JPEG images; put the images there, or in one subfolder "
            "per class."
        )
    tops = sorted({e[0].split("/", 1)[0] for e in nested})
    if _SPLIT_NAMES.isdisjoint(tops):
        ordered, class_names = _by_class(nested)
        index = {name: label for label, name in enumerate(class_names)}
        labels = np.array([index[e[0].split("/", 1)[0]] for e in ordered], dtype=np.int64)
        return ordered, FolderLayout(tuple(e[0] for e in ordered), labels, class_names, 0)
    return _split_layout(nested, tops, where)


def _split_layout(
    nested: list[_Entry], tops: list[str], where: str
) -> tuple[list[_Entry], FolderLayout]:
    """A folder with ``train/<class>/`` and ``test/<class>/``: the training split, then the
    test split, each by class; labels numbered by the training split's classes."""
    if tops != sorted(SPLITS):
        others = [top for top in tops if top not in SPLITS]
        missing = [split for split in SPLITS if split not in tops]
        fix = f"move {_listed(others)} out of it" if others else f"add {_listed(missing)}"
        raise DataError(
            f"{where} has the subfolders {_listed(tops)}: a dataset split into train/ and test/ "
            "must hold exactly those two, each with one subfolder per class, and a folder of "
            f"classes cannot have classes named {', '.join(sorted(_SPLIT_NAMES))}; {fix}, or "
            "rename them."
        )
    splits: dict[str, list[_Entry]] = {}
    for split in SPLITS:
        cut = len(split) + 1
        inside = [(e[0][cut:], e[1], e[2]) for e in nested if e[0].split("/", 1)[0] == split]
        direct = sorted(e[0] for e in inside if "/" not in e[0])
        if direct:
            raise DataError(
                f"{where}: {split}/ holds images directly ({split}/{direct[0]}); in a dataset "
                f"split into train/ and test/ every image is in a class subfolder of its split "
                f"({split}/<class>/), so move them into one."
            )
        splits[split] = inside
    train, class_names = _by_class(splits["train"])
    test, test_classes = _by_class(splits["test"])
    if test_classes != class_names:
        extra = [name for name in test_classes if name not in class_names]
        lacking = [name for name in class_names if name not in test_classes]
        differences = []
        if extra:
            differences.append(f"test/ has {_listed(extra)}, which train/ lacks")
        if lacking:
            differences.append(f"test/ lacks {_listed(lacking)}")
        raise DataError(
            f"{where}: the classes of train/ and test/ differ ({'; '.join(differences)}); give "
            "both splits the same class subfolders."
        )
    index = {name: label for label, name in enumerate(class_names)}
    ordered = [
        (f"{split}/{e[0]}", e[1], e[2])
        for split, part in zip(SPLITS, (train, test), strict=True)
        for e in part
    ]
    labels = np.array([index[e[0].split("/", 2)[1]] for e in ordered], dtype=np.int64)
    layout = FolderLayout(tuple(e[0] for e in ordered), labels, class_names, len(test))
    return ordered, layout


def scan_folder(folder: Path) -> FolderLayout:
    """The image files of a folder or tar archive, their labels, class names and test split,
    without decoding any image.

    Raises:
        DataError: Not a folder or readable archive, no images, or a layout that could be
            misread (see the module docstring).
    """
    if folder.is_file() and is_archive(folder):
        entries, _prefix = _archive_entries(folder)
    else:
        entries = _folder_entries(folder)
    return _layout(entries, str(folder))[1]


def _pillow() -> tuple[ModuleType, ModuleType]:
    try:
        return importlib.import_module("PIL.Image"), importlib.import_module("PIL.ImageOps")
    except ImportError as error:
        raise DataError(
            'Reading a folder of images needs Pillow; install it with pip install "fedssd[images]".'
        ) from error


def decode_image(path: Path, *, image_size: int, rgb: bool) -> np.ndarray:
    """One image file -> ``(channels, image_size, image_size)`` uint8 (see the module docstring).

    Raises:
        DataError: The file cannot be read or decoded.
    """
    return _decode(path, str(path), image_size=image_size, rgb=rgb)


def _decode(source: Path | IO[bytes], where: str, *, image_size: int, rgb: bool) -> np.ndarray:
    image_module, ops = _pillow()
    # Pillow raises many types (UnidentifiedImageError, OSError for truncated data, ValueError,
    # DecompressionBombError, SyntaxError from some plugins) for a bad file.
    try:
        with image_module.open(source) as opened:
            picture = ops.exif_transpose(opened)
            picture = _to_mode(picture, image_module, rgb=rgb)
            picture = _resize_crop(picture, image_module, image_size)
    except Exception as error:
        raise DataError(
            f"{where} cannot be read as an image ({type(error).__name__}); remove or replace it."
        ) from error
    array = np.asarray(picture, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _to_mode(picture: Any, image_module: ModuleType, *, rgb: bool) -> Any:
    """Any Pillow mode -> ``RGB`` or ``L``."""
    mode = picture.mode
    if mode.startswith("I") or mode == "F":
        # 16-bit (I;16*) and 32-bit integer images: scale 0..65535 to 0..255 instead of the
        # clipping a plain convert would do.
        values = np.asarray(picture, dtype=np.float64)
        scaled = np.clip(values, 0, 65535) // 257 if mode != "F" else np.clip(values, 0, 255)
        picture = image_module.fromarray(scaled.astype(np.uint8), "L")
    elif mode == "P" and "transparency" in picture.info:
        picture = picture.convert("RGBA")
    if picture.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = picture.convert("RGBA")
        black = image_module.new("RGBA", rgba.size, (0, 0, 0, 255))
        picture = image_module.alpha_composite(black, rgba)
    return picture.convert("RGB" if rgb else "L")


def _resize_crop(picture: Any, image_module: ModuleType, size: int) -> Any:
    """Shorter side to ``size`` (BICUBIC, antialiased when shrinking), then a centre crop."""
    width, height = picture.size
    if width <= height:
        new = (size, max(size, round(height * size / width)))
    else:
        new = (max(size, round(width * size / height)), size)
    if new != (width, height):
        picture = picture.resize(new, image_module.Resampling.BICUBIC)
    left = (new[0] - size) // 2
    top = (new[1] - size) // 2
    return picture.crop((left, top, left + size, top + size))


def _signature(source: object, *, image_size: int, rgb: bool) -> str:
    """SHA-256 of everything the decoded array depends on (``source``: a folder's entries, or
    an archive's size and modification time)."""
    text = json.dumps(
        {"source": source, "image_size": image_size, "rgb": rgb, "decoder": _DECODER_VERSION},
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_places(source: Path, cache_root: Path | None, *, archive: bool) -> list[Path]:
    """Where the cache of ``source`` may live: inside a folder, else under the data root (an
    archive: only under the data root)."""
    base = cache_root if cache_root is not None else default_root()
    key = hashlib.sha256(str(source.resolve()).encode("utf-8")).hexdigest()[:16]
    shared = base / "folder-cache" / key
    return [shared] if archive else [source / CACHE_DIR, shared]


def _stem(image_size: int, rgb: bool) -> str:
    return f"images-{image_size}-{'rgb' if rgb else 'l'}"


def _load_cache(place: Path, stem: str, signature: str, *, log: Log) -> FolderImages | None:
    manifest_path = place / f"{stem}.json"
    if not manifest_path.is_file():
        return None
    # Any damage (bad JSON, missing or altered arrays) means decoding again, never a crash.
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("decoder") != _DECODER_VERSION:
            log(f"{place}: the images were decoded by another version of fedssd; decoding again")
            return None
        if manifest.get("signature") != signature:
            log(f"{place}: the images changed since they were decoded; decoding them again")
            return None
        arrays = {}
        for key in ("images", "labels"):
            path = place / f"{stem}.{key}.npy"
            if _sha256(path) != manifest["sha256"][key]:
                raise ValueError(f"{path.name} does not match its digest")
            arrays[key] = np.load(path, mmap_mode="r", allow_pickle=False)
        images, labels = arrays["images"], arrays["labels"]
        files = tuple(str(f) for f in manifest["files"])
        class_names = tuple(str(c) for c in manifest["class_names"])
        num_test = manifest["num_test"]
        if (
            images.dtype != np.uint8
            or images.ndim != 4
            or labels.dtype != np.int64
            or labels.shape != (images.shape[0],)
            or len(files) != images.shape[0]
            or not isinstance(num_test, int)
            or not 0 <= num_test <= images.shape[0]
        ):
            raise ValueError("the arrays do not have the recorded form")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log(f"{place}: the decoded-image cache is damaged ({error}); decoding the images again")
        return None
    return FolderImages(
        images=images, labels=labels, class_names=class_names, files=files, num_test=num_test
    )


def _save_array(path: Path, array: np.ndarray) -> str:
    temp = temporary_sibling(path)
    try:
        with temp.open("xb") as out:
            np.save(out, array, allow_pickle=False)
            out.flush()
            os.fsync(out.fileno())
        digest = _sha256(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return digest


def _save_cache(place: Path, stem: str, decoded: FolderImages, signature: str) -> None:
    place.mkdir(parents=True, exist_ok=True)
    digests = {
        "images": _save_array(place / f"{stem}.images.npy", decoded.images),
        "labels": _save_array(place / f"{stem}.labels.npy", decoded.labels),
    }
    manifest = {
        "format": 2,
        "decoder": _DECODER_VERSION,
        "signature": signature,
        "sha256": digests,
        "shape": list(decoded.images.shape),
        "class_names": list(decoded.class_names),
        "num_test": decoded.num_test,
        "files": list(decoded.files),
    }
    manifest_path = place / f"{stem}.json"
    temp = temporary_sibling(manifest_path)
    try:
        temp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(temp, manifest_path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _decode_folder(
    folder: Path, files: Sequence[str], *, image_size: int, rgb: bool, say: Log
) -> np.ndarray:
    channels = 3 if rgb else 1
    images = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    for i, name in enumerate(files):
        images[i] = decode_image(folder / name, image_size=image_size, rgb=rgb)
        if (i + 1) % _PROGRESS_EVERY == 0:
            say(f"{folder}: decoded {i + 1} of {len(files)}")
    return images


def _decode_archive(
    archive: Path, files: Sequence[str], prefix: str, *, image_size: int, rgb: bool, say: Log
) -> np.ndarray:
    """Decode the wanted members in one sequential pass over the archive (a compressed stream
    has no cheap random access)."""
    index = {prefix + name: i for i, name in enumerate(files)}
    channels = 3 if rgb else 1
    images = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    done = np.zeros(len(files), dtype=bool)
    decoded = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = _member_name(member)
                i = index.get(name) if name is not None else None
                if i is None:
                    continue
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                data = handle.read()
                where = f"{archive}: {name}"
                images[i] = _decode(io.BytesIO(data), where, image_size=image_size, rgb=rgb)
                decoded += 1
                if decoded % _PROGRESS_EVERY == 0:
                    say(f"{archive}: decoded {decoded} of {len(files)}")
                done[i] = True
    except _ARCHIVE_ERRORS as error:
        raise _archive_error(archive, error) from error
    if not done.all():
        missing = files[int(np.flatnonzero(~done)[0])]
        raise DataError(
            f"{archive} changed while it was read ({prefix}{missing} is gone); read it again."
        )
    return images


def read_image_folder(
    folder: str | Path,
    *,
    image_size: int = 32,
    rgb: bool = True,
    cache_root: str | Path | None = None,
    log: Log | None = None,
) -> FolderImages:
    """Read a folder (or tar archive) of images, from its verified cache when it has not changed.

    Args:
        folder: The folder (images directly in it, one subfolder per class, or ``train/`` and
            ``test/`` with one subfolder per class in each), or a tar archive of one.
        image_size: Side of the square output images.
        rgb: 3 channels (grayscale repeated) if true, else one grayscale channel.
        cache_root: Where the cache goes when the folder is read-only, and an archive's cache
            (default: the data root).
        log: Receives one line per decision.

    Returns:
        The decoded images, labels, class names and size of the test split.

    Raises:
        DataError: Not a folder or readable archive, no images, a layout that could be misread,
            or an unreadable image file.
    """
    say = log if log is not None else _silent
    place = Path(folder).expanduser()
    archive = place.is_file() and is_archive(place)
    root = None if cache_root is None else Path(cache_root).expanduser()
    places = _cache_places(place, root, archive=archive)
    stem = _stem(image_size, rgb)
    entries: list[_Entry] = []
    prefix = ""
    if archive:
        # The archive's own size and time stand for its content, so a cached archive is used
        # without reading it (decompressing a large archive costs far more than the check).
        stat = place.stat()
        signature = _signature([stat.st_size, stat.st_mtime_ns], image_size=image_size, rgb=rgb)
    else:
        entries = _folder_entries(place)
        signature = _signature([list(e) for e in sorted(entries)], image_size=image_size, rgb=rgb)
    for cache in places:
        cached = _load_cache(cache, stem, signature, log=say)
        if cached is not None:
            say(f"{place}: using the {cached.images.shape[0]} decoded images cached in {cache}")
            return cached
    if archive:
        entries, prefix = _archive_entries(place)
        if prefix:
            say(f"{place}: reading the folder {prefix} that holds everything in it")
    _, layout = _layout(entries, str(place))
    split = f" ({layout.num_test} in the test split)" if layout.num_test else ""
    say(f"{place}: decoding {len(layout.files)} images{split} to {image_size}x{image_size} (once)")
    if archive:
        images = _decode_archive(
            place, layout.files, prefix, image_size=image_size, rgb=rgb, say=say
        )
    else:
        images = _decode_folder(place, layout.files, image_size=image_size, rgb=rgb, say=say)
    decoded = FolderImages(
        images=images,
        labels=layout.labels,
        class_names=layout.class_names,
        files=layout.files,
        num_test=layout.num_test,
    )
    for cache in places:
        try:
            _save_cache(cache, stem, decoded, signature)
        except OSError as error:
            say(f"{place}: cannot write the cache in {cache} ({error.strerror or error})")
            continue
        say(f"{place}: saved the decoded images to {cache}")
        break
    return decoded
