"""Draw a few CIFAR-10 photos and the two augmented views SSD trains on (docs/figures).

Usage: ``python -m benchmarks.augment_figure [--archive PATH] [--out FILE.png] [--seed N]``.

Reads the first photo of each of the first ``--classes`` classes of the archive's ``test/``
split (``../shared/data/cifar10-jpeg.tar.gz`` by default), makes two views of each with
:func:`fedssd.data.augment.two_views` and the paper's augmentation (``SSL_AUGMENT``: random
resized crop, flip, colour jitter with p = 0.8, grayscale with p = 0.2) from a generator seeded
with ``--seed``, and writes one row per photo: the photo, view 1, view 2, each enlarged 4 times
(nearest neighbour, so the 32x32 pixels stay visible). Needs Pillow only.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fedssd.data.augment import SSL_AUGMENT, two_views

_ARCHIVE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
_SCALE = 4
_GAP = 6
_LABEL = 14


def first_photos(archive: Path, classes: int) -> tuple[list[str], torch.Tensor]:
    """The first test photo of each of the first ``classes`` classes (sorted by name)."""
    found: dict[str, np.ndarray] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if member.isdir():
                continue
            parts = member.name.split("/")
            if not (member.isfile() and len(parts) == 3 and parts[0] == "test"):
                if found:
                    break  # past the test split (a tar of a folder lists it in one stretch)
                continue
            if parts[1] not in found:
                handle = tar.extractfile(member)
                assert handle is not None
                found[parts[1]] = np.asarray(Image.open(io.BytesIO(handle.read())).convert("RGB"))
    names = sorted(found)[:classes]
    pixels = np.stack([found[name] for name in names]).transpose(0, 3, 1, 2)
    return names, torch.from_numpy(np.ascontiguousarray(pixels))


def _tile(image: torch.Tensor) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    side = array.shape[0] * _SCALE
    return Image.fromarray(array).resize((side, side), Image.Resampling.NEAREST)


def draw(names: list[str], photos: torch.Tensor, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    first, second = two_views(photos, SSL_AUGMENT, generator=generator)
    columns = (photos.float() / 255, first, second)
    side = photos.shape[-1] * _SCALE
    width = 3 * side + 4 * _GAP
    height = _LABEL + len(names) * (side + _GAP) + _GAP
    sheet = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(sheet)
    for c, title in enumerate(("photo", "view 1", "view 2")):
        pen.text((_GAP + c * (side + _GAP), 2), title, fill="black")
    for r, name in enumerate(names):
        top = _LABEL + r * (side + _GAP)
        for c, images in enumerate(columns):
            sheet.paste(_tile(images[r]), (_GAP + c * (side + _GAP), top))
        pen.text((_GAP + 2, top + 2), name, fill="white")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=_ARCHIVE)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/photos-two-views.png"))
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    names, photos = first_photos(args.archive, args.classes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(names, photos, args.seed).save(args.out, optimize=True)
    print(f"wrote {args.out}: {', '.join(names)}")


if __name__ == "__main__":
    main()
