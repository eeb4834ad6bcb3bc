"""Folders with their own test split (``train/<class>/``, ``test/<class>/``) and tar archives of
image folders: what is read, what is refused, and where an archive's cache goes."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fedssd.data.folder as folder_module
from fedssd.api import load_config
from fedssd.data.datasets import load_dataset, locate_dataset
from fedssd.data.federated import prepare_data, run_evaluation_views, server_evaluation_views
from fedssd.data.folder import CACHE_DIR, read_image_folder, scan_folder
from fedssd.data.sites import load_site
from fedssd.errors import DataError
from fedssd.experiment import partition_record

SMOKE = Path(__file__).resolve().parents[2] / "src" / "fedssd" / "configs" / "smoke.toml"
TRAIN = {"cat": 3, "dog": 2, "emu": 2}
TEST = {"cat": 1, "dog": 2, "emu": 1}


def _png(path: Path, seed: int, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _split_folder(root: Path, train: dict[str, int] = TRAIN, test: dict[str, int] = TEST) -> Path:
    seed = 0
    for split, counts in (("train", train), ("test", test)):
        for name, count in counts.items():
            for i in range(count):
                seed += 1
                _png(root / split / name / f"{i:02d}.png", seed)
    return root


def _tar(source: Path, archive: Path, *, wrapper: str | None = None) -> Path:
    mode = "w:gz" if archive.name.endswith("gz") else "w"
    with tarfile.open(archive, mode) as tar:
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source).as_posix()
            tar.add(path, arcname=f"{wrapper}/{relative}" if wrapper else relative, recursive=False)
    return archive


def _fail(*_args: object, **_kwargs: object) -> np.ndarray:
    raise AssertionError("the cache should have been used")


def test_train_and_test_subfolders_are_the_splits_not_two_classes(tmp_path: Path) -> None:
    folder = _split_folder(tmp_path / "photos")
    dataset = load_dataset("folder", path=folder, image_size=8)
    assert dataset.class_names == ("cat", "dog", "emu") and dataset.num_classes == 3
    assert dataset.x_train.shape == (7, 3, 8, 8) and dataset.x_test.shape == (4, 3, 8, 8)
    assert dataset.y_train.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert dataset.y_test.tolist() == [0, 1, 1, 2]
    read = read_image_folder(folder, image_size=8)
    assert read.num_test == 4
    assert read.files[:2] == ("train/cat/00.png", "train/cat/01.png")
    assert read.files[-1] == "test/emu/00.png"
    # The test images are the test split's own pixels.
    expected = np.asarray(Image.open(folder / "test" / "dog" / "01.png").resize((8, 8), 3))
    assert np.array_equal(dataset.x_test[2].numpy(), expected.transpose(2, 0, 1))


def test_a_run_trains_on_train_and_evaluates_on_test(tmp_path: Path) -> None:
    folder = _split_folder(tmp_path / "photos")
    cfg = load_config(
        SMOKE,
        overrides=[
            "data.name=folder",
            f"data.path={folder}",
            "data.partition=iid",
            "data.train_subset=0",
            "data.test_subset=0",
            "data.image_size=8",
            "federation.num_clients=2",
        ],
    )
    data = prepare_data(cfg, log=lambda _m: None)
    assert sorted(np.concatenate(data.client_indices).tolist()) == list(range(7))
    assert not data.federated_evaluation
    views = run_evaluation_views(cfg, data, log=lambda _m: None)
    assert views is not None
    assert views.train_images.shape[0] == 7 and views.test_labels.tolist() == [0, 1, 1, 2]
    assert partition_record(cfg, data)["class_names"] == ["cat", "dog", "emu"]
    # The server's own evaluation set split into train/ and test/ keeps its two splits (read at
    # the side of the run's dataset, Fashion-MNIST's 32).
    server = load_config(SMOKE, overrides=[f"evaluation.data={folder}"])
    views = server_evaluation_views(server, log=lambda _m: None)
    assert views is not None
    assert views.train_images.shape[0] == 7 and views.test_images.shape[0] == 4


@pytest.mark.parametrize(
    ("name", "wrapper"), [("photos.tar.gz", None), ("photos.tgz", "photos"), ("photos.tar", None)]
)
def test_a_tar_archive_reads_as_the_folder_it_unpacks_to(
    tmp_path: Path, name: str, wrapper: str | None
) -> None:
    folder = _split_folder(tmp_path / "photos")
    from_folder = read_image_folder(folder, image_size=8)
    shared = tmp_path / "shared"
    shared.mkdir()
    archive = _tar(folder, shared / name, wrapper=wrapper)
    root = tmp_path / "root"
    logs: list[str] = []
    read = read_image_folder(archive, image_size=8, cache_root=root, log=logs.append)
    assert np.array_equal(read.images, from_folder.images)
    assert read.files == from_folder.files and read.class_names == from_folder.class_names
    assert read.num_test == 4 and read.labels.tolist() == from_folder.labels.tolist()
    assert scan_folder(archive).files == from_folder.files
    assert (wrapper is not None) == any("photos/" in line for line in logs), logs
    # Nothing is written beside the archive; the cache is under the data root.
    assert sorted(os.listdir(shared)) == [name]
    assert len(list((root / "folder-cache").glob("*/images-8-rgb.json"))) == 1
    assert locate_dataset("folder", path=archive) == archive
    site = load_site(archive, image_size=8, root=root)
    assert site.x_test.shape[0] == 4 and site.class_names == ("cat", "dog", "emu")


def test_an_archive_is_decoded_once_and_again_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _split_folder(tmp_path / "photos")
    archive = _tar(folder, tmp_path / "photos.tar.gz")
    root = tmp_path / "root"
    first = read_image_folder(archive, image_size=8, cache_root=root)
    with monkeypatch.context() as patch:
        patch.setattr(folder_module, "_decode", _fail)
        patch.setattr(folder_module, "_archive_entries", _fail)
        logs: list[str] = []
        again = read_image_folder(archive, image_size=8, cache_root=root, log=logs.append)
        assert isinstance(again.images, np.memmap) and again.num_test == first.num_test
        assert np.array_equal(again.images, first.images)
        assert any("using" in line for line in logs), logs
    # Another archive in the same place (one more training image): decoded again.
    _png(folder / "train" / "emu" / "09.png", 99)
    _tar(folder, archive)
    os.utime(archive, ns=(1, 1))
    logs = []
    changed = read_image_folder(archive, image_size=8, cache_root=root, log=logs.append)
    assert changed.images.shape[0] == 12 and any("changed" in line for line in logs), logs


def test_a_cache_from_the_reader_that_saw_two_classes_is_rebuilt(tmp_path: Path) -> None:
    folder = _split_folder(tmp_path / "photos")
    read_image_folder(folder, image_size=8)
    manifest_path = folder / CACHE_DIR / "images-8-rgb.json"
    manifest = json.loads(manifest_path.read_text())
    # What the previous reader wrote: no decoder version, classes "test" and "train".
    del manifest["decoder"]
    manifest["class_names"] = ["test", "train"]
    manifest_path.write_text(json.dumps(manifest))
    logs: list[str] = []
    read = read_image_folder(folder, image_size=8, log=logs.append)
    assert read.class_names == ("cat", "dog", "emu")
    assert any("another version" in line for line in logs), logs


def _images_in(split: str) -> Callable[[Path], None]:
    def make(root: Path) -> None:
        _split_folder(root)
        _png(root / split / "loose.png", 50)

    return make


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        # Only train/ and test/, holding images directly: no classes to read.
        (
            lambda p: [_png(p / s / f"{i}.png", i) for s in ("train", "test") for i in range(2)],
            r"train/ holds images directly \(train/0.png\)",
        ),
        (_images_in("test"), r"test/ holds images directly \(test/loose.png\)"),
        (_images_in("train"), r"train/ holds images directly"),
        (lambda p: _split_folder(p, test={}), r"has the subfolders train/: .*add test/"),
        (lambda p: _split_folder(p, train={}), r"has the subfolders test/: .*add train/"),
        (
            lambda p: (_split_folder(p), _png(p / "val" / "cat" / "0.png", 7)),
            r"has the subfolders test/, train/, val/: .*move val/ out of it",
        ),
        (
            lambda p: (_split_folder(p), _png(p / "extra" / "0.png", 7)),
            r"move extra/ out of it",
        ),
        # A folder of classes one of which is named like a split.
        (
            lambda p: [_png(p / c / "0.png", i) for i, c in enumerate(("cat", "validation"))],
            r"cannot have classes named",
        ),
        (
            lambda p: _split_folder(p, test={"cat": 1, "dog": 1, "gnu": 1}),
            r"classes of train/ and test/ differ \(test/ has gnu/, which train/ lacks; "
            r"test/ lacks emu/\)",
        ),
    ],
)
def test_layouts_that_could_be_misread_give_one_sentence(
    tmp_path: Path, make: Callable[[Path], object], fragment: str
) -> None:
    folder = tmp_path / "data"
    make(folder)
    for source in (folder, _tar(folder, tmp_path / "data.tar.gz")):
        with pytest.raises(DataError, match=fragment) as caught:
            read_image_folder(source, image_size=8, cache_root=tmp_path / "root")
        message = str(caught.value)
        assert message.endswith(".") and "\n" not in message


def test_bad_archives_give_one_sentence(tmp_path: Path) -> None:
    folder = _split_folder(tmp_path / "photos")
    archive = _tar(folder, tmp_path / "photos.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    text = tmp_path / "notes.txt"
    text.write_text("not images")
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    for source, fragment in (
        (cut, "cannot be read as a tar archive"),
        (text, "is not a folder; point it at a folder of PNG or JPEG images, or at a tar"),
        (empty, "holds no PNG or JPEG images"),
    ):
        with pytest.raises(DataError, match=fragment) as caught:
            load_dataset("folder", path=source, root=tmp_path / "root", image_size=8)
        assert "\n" not in str(caught.value)
