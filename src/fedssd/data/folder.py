"""Your own images: a folder of PNG/JPEG files, decoded once into a verified cache.

Layout. The images sit either directly in the folder (no labels) or in one subfolder per class
(labels; classes are numbered in the sorted order of the subfolder names, and the names are
kept). A folder with both loose images and class subfolders is refused. Hidden files and folders
(names starting with ``.``) and files of other types are ignored; images are read in sorted order
of their paths, which is the order of the dataset.

Decoding. Every image is converted to RGB (``rgb = true``; grayscale is repeated to 3 channels)
or to one luma channel ``L`` (``rgb = false``; ITU-R 601-2 weights), with its EXIF orientation
applied. Palette, CMYK and two-level images are converted by Pillow; an alpha channel is
composited onto black; 16-bit grayscale is scaled to 8 bits (``value // 257``). The image is then
resized so that its shorter side is ``image_size`` (Pillow's BICUBIC filter, whose support grows
with the reduction factor, so shrinking is antialiased) and centre-cropped to ``image_size`` x
``image_size``.

Cache. The decoded uint8 array ``(n, channels, size, size)`` and the labels are saved as ``.npy``
files (``numpy.load(..., mmap_mode="r")`` maps them without reading) with a JSON manifest that
holds the source's signature (every file's relative path, size and modification time, the image
size and channel mode, and the decoder version) and the SHA-256 of both ``.npy`` files. It lives
in ``<folder>/.fedssd-cache/``, or, when the folder cannot be written, in
``<root>/folder-cache/<hash of the folder's path>/`` (root: ``data.root``, else
``$FEDSSD_DATA``, else ``~/.cache/fedssd``). A cache whose signature or digests do not match is
decoded again (with a log line); files are written to temporary names and renamed, the manifest
last, so an interrupted write leaves either the old cache or none. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from fedssd.data.fetch import Log, _silent, default_root, temporary_sibling
from fedssd.errors import DataError

__all__ = [
    "CACHE_DIR",
    "IMAGE_SUFFIXES",
    "FolderImages",
    "decode_image",
    "read_image_folder",
    "scan_folder",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
CACHE_DIR = ".fedssd-cache"
# Bumped whenever decoding changes, so that caches made by another decoder are rebuilt.
_DECODER_VERSION = 1
_HASH_CHUNK = 1 << 22
_PROGRESS_EVERY = 10_000


@dataclass(frozen=True)
class FolderImages:
    """A decoded image folder.

    Attributes:
        images: ``(n, channels, size, size)`` uint8 (read-only when mapped from the cache).
        labels: ``(n,)`` int64 class ids, or -1 for every image of an unlabelled folder.
        class_names: The class subfolders in label order; empty when unlabelled.
        files: The images' paths relative to the folder, in dataset order.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    files: tuple[str, ...]

    @property
    def labelled(self) -> bool:
        """Whether the images came with class labels (one subfolder per class)."""
        return bool(self.class_names)


_Entry = tuple[str, int, int]


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


def _scan(folder: Path) -> tuple[list[_Entry], np.ndarray, tuple[str, ...]]:
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; point it at a folder of PNG or JPEG images.")
    try:
        entries = _walk(folder)
    except OSError as error:
        raise DataError(
            f"Cannot list {error.filename or folder} ({error.strerror}); check its permissions."
        ) from error
    loose = sorted(e for e in entries if "/" not in e[0])
    nested = [e for e in entries if "/" in e[0]]
    if loose and nested:
        raise DataError(
            f"{folder} holds both images ({loose[0][0]}) and class subfolders "
            f"({nested[0][0].split('/')[0]}); put every image in a class subfolder (labelled) or "
            "all of them directly in the folder (unlabelled)."
        )
    if loose:
        return loose, np.full(len(loose), -1, dtype=np.int64), ()
    if not nested:
        raise DataError(
            f"{folder} holds no PNG or JPEG images; put the images there, or in one subfolder "
            "per class."
        )
    # Sorted by class, then by the path within the class (not by the joined path, in which a
    # class "a-b" would sort before "a").
    nested.sort(key=lambda e: tuple(e[0].split("/", 1)))
    class_names = tuple(sorted({e[0].split("/", 1)[0] for e in nested}))
    index = {name: label for label, name in enumerate(class_names)}
    labels = np.array([index[e[0].split("/", 1)[0]] for e in nested], dtype=np.int64)
    return nested, labels, class_names


def scan_folder(folder: Path) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """The image files of a folder, their labels and the class names (no decoding).

    Returns:
        ``(relative paths in dataset order, int64 labels (-1 if unlabelled), class names)``.

    Raises:
        DataError: Not a folder, no images, or loose images next to class subfolders.
    """
    entries, labels, class_names = _scan(folder)
    return [e[0] for e in entries], labels, class_names


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
    image_module, ops = _pillow()
    # Pillow raises many types (UnidentifiedImageError, OSError for truncated data, ValueError,
    # DecompressionBombError, SyntaxError from some plugins) for a bad file.
    try:
        with image_module.open(path) as opened:
            picture = ops.exif_transpose(opened)
            picture = _to_mode(picture, image_module, rgb=rgb)
            picture = _resize_crop(picture, image_module, image_size)
    except Exception as error:
        raise DataError(
            f"{path} cannot be read as an image ({type(error).__name__}); remove or replace it."
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


def _signature(entries: Sequence[_Entry], *, image_size: int, rgb: bool) -> str:
    """SHA-256 of everything the decoded array depends on."""
    text = json.dumps(
        {
            "files": [list(e) for e in entries],
            "image_size": image_size,
            "rgb": rgb,
            "decoder": _DECODER_VERSION,
        },
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_places(folder: Path, cache_root: Path | None) -> list[Path]:
    """Where the cache of ``folder`` may live: inside it, else under the data root."""
    base = cache_root if cache_root is not None else default_root()
    key = hashlib.sha256(str(folder.resolve()).encode("utf-8")).hexdigest()[:16]
    return [folder / CACHE_DIR, base / "folder-cache" / key]


def _stem(image_size: int, rgb: bool) -> str:
    return f"images-{image_size}-{'rgb' if rgb else 'l'}"


def _load_cache(place: Path, stem: str, signature: str, *, log: Log) -> FolderImages | None:
    manifest_path = place / f"{stem}.json"
    if not manifest_path.is_file():
        return None
    # Any damage (bad JSON, missing or altered arrays) means decoding again, never a crash.
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
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
        if (
            images.dtype != np.uint8
            or images.ndim != 4
            or labels.dtype != np.int64
            or labels.shape != (images.shape[0],)
            or len(files) != images.shape[0]
        ):
            raise ValueError("the arrays do not have the recorded form")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log(f"{place}: the decoded-image cache is damaged ({error}); decoding the images again")
        return None
    return FolderImages(images=images, labels=labels, class_names=class_names, files=files)


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
        "format": 1,
        "signature": signature,
        "sha256": digests,
        "shape": list(decoded.images.shape),
        "class_names": list(decoded.class_names),
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


def read_image_folder(
    folder: str | Path,
    *,
    image_size: int = 32,
    rgb: bool = True,
    cache_root: str | Path | None = None,
    log: Log | None = None,
) -> FolderImages:
    """Read a folder of images, from its verified cache when the files have not changed.

    Args:
        folder: The folder (images directly in it, or one subfolder per class).
        image_size: Side of the square output images.
        rgb: 3 channels (grayscale repeated) if true, else one grayscale channel.
        cache_root: Where the cache goes when the folder is read-only (default: the data root).
        log: Receives one line per decision.

    Returns:
        The decoded images, labels and class names.

    Raises:
        DataError: Not a folder, no images, a mixed layout, or an unreadable image file.
    """
    say = log if log is not None else _silent
    place = Path(folder).expanduser()
    entries, labels, class_names = _scan(place)
    files = [e[0] for e in entries]
    signature = _signature(entries, image_size=image_size, rgb=rgb)
    stem = _stem(image_size, rgb)
    places = _cache_places(place, None if cache_root is None else Path(cache_root).expanduser())
    for cache in places:
        cached = _load_cache(cache, stem, signature, log=say)
        if cached is not None:
            say(f"{place}: using the {cached.images.shape[0]} decoded images cached in {cache}")
            return cached
    say(f"{place}: decoding {len(files)} images to {image_size}x{image_size} (once)")
    channels = 3 if rgb else 1
    images = np.empty((len(files), channels, image_size, image_size), dtype=np.uint8)
    for i, name in enumerate(files):
        images[i] = decode_image(place / name, image_size=image_size, rgb=rgb)
        if (i + 1) % _PROGRESS_EVERY == 0:
            say(f"{place}: decoded {i + 1} of {len(files)}")
    decoded = FolderImages(
        images=images, labels=labels, class_names=class_names, files=tuple(files)
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
