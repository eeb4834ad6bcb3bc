"""Time reading a folder of images: decoding it once, then loading the decoded cache.

Usage: ``python benchmarks/folder_cache.py DIR [COUNT]``. When ``DIR`` does not exist it is
filled with ``COUNT`` (default 10 000) random 48x64 RGB PNG files in 10 class folders. The
folder is then read three times with ``fedssd.data.sites.load_site(DIR, image_size=32)``: the
first read decodes (unless a cache is already there) and the next two use the cache.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fedssd.data.sites import load_site


def main() -> None:
    root = Path(sys.argv[1])
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    if not root.exists():
        rng = np.random.default_rng(0)
        for i in range(count):
            folder = root / f"class{i % 10}"
            folder.mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
            Image.fromarray(image).save(folder / f"{i:05d}.png")
    for attempt in ("first read", "second read", "third read"):
        started = time.perf_counter()
        dataset = load_site(root, image_size=32)
        seconds = time.perf_counter() - started
        shape = tuple(dataset.x_train.shape)
        print(f"{attempt}: {seconds:.3f} s for images {shape}")


if __name__ == "__main__":
    main()
