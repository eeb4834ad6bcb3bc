"""Your own images: the folder reader and its cache, unlabelled .npz files, real-site splits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fedssd.data.folder as folder_module
from fedssd.data.datasets import load_dataset
from fedssd.data.federated import node_data, prepare_data
from fedssd.data.folder import CACHE_DIR, decode_image, read_image_folder
from fedssd.data.sites import load_site
from fedssd.errors import ConfigError, DataError
from fedssd.experiment import partition_record
from fedssd.runs.resolve import load_config

SMOKE = Path(__file__).resolve().parents[2] / "src" / "fedssd" / "configs" / "smoke.toml"


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def _noise(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _labelled_folder(root: Path, rng: np.random.Generator) -> Path:
    """Classes 'zebra' (2 images) and 'ant' (3 images) of various sizes and modes."""
    _png(root / "zebra" / "b.png", _noise(rng, 40, 20, 3))
    _png(root / "zebra" / "a.jpg", _noise(rng, 16, 50, 3))
    _png(root / "ant" / "3.png", _noise(rng, 32, 32))
    _png(root / "ant" / "1.png", _noise(rng, 64, 48, 4), "RGBA")
    _png(root / "ant" / "sub" / "2.jpeg", _noise(rng, 10, 10, 3))
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_labelled_folder_sizes_labels_and_class_names(tmp_path: Path) -> None:
    folder = _labelled_folder(tmp_path / "data", np.random.default_rng(0))
    read = read_image_folder(folder, image_size=12, rgb=True)
    assert read.images.shape == (5, 3, 12, 12) and read.images.dtype == np.uint8
    assert read.class_names == ("ant", "zebra")
    assert read.files == ("ant/1.png", "ant/3.png", "ant/sub/2.jpeg", "zebra/a.jpg", "zebra/b.png")
    assert read.labels.tolist() == [0, 0, 0, 1, 1]
    gray = read_image_folder(folder, image_size=12, rgb=False)
    assert gray.images.shape == (5, 1, 12, 12)


def test_resize_is_shorter_side_then_centre_crop(tmp_path: Path) -> None:
    # A 20 x 40 (w x h) image, black in its top and bottom 6 rows, white between: resized to
    # 10 x 20 and centre-cropped to 10 x 10, only the white middle remains.
    array = np.zeros((40, 20), dtype=np.uint8)
    array[6:34] = 255
    path = _png(tmp_path / "tall.png", array)
    out = decode_image(path, image_size=10, rgb=False)
    assert out.shape == (1, 10, 10)
    assert out.min() >= 250
    expected = (
        Image.fromarray(array).resize((10, 20), Image.Resampling.BICUBIC).crop((0, 5, 10, 15))
    )
    assert np.array_equal(out[0], np.asarray(expected))
    # Grayscale to RGB repeats the channel.
    rgb = decode_image(path, image_size=10, rgb=True)
    assert rgb.shape == (3, 10, 10) and np.array_equal(rgb[0], rgb[2])


def test_sixteen_bit_and_palette_images_are_converted(tmp_path: Path) -> None:
    deep = np.full((8, 8), 65535, dtype=np.uint16)
    deep[:, :4] = 257 * 10
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    out = decode_image(path, image_size=8, rgb=False)
    assert out[0, 0, 0] == 10 and out[0, 0, 7] == 255
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    palette.save(tmp_path / "p.png")
    assert decode_image(tmp_path / "p.png", image_size=8, rgb=True).shape == (3, 8, 8)


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name in ("c.png", "a.png", "b.jpg"):
        _png(tmp_path / "flat" / name, _noise(rng, 30, 30, 3))
    dataset = load_dataset("folder", path=tmp_path / "flat", image_size=16)
    assert dataset.x_train.shape == (3, 3, 16, 16) and dataset.x_train.is_contiguous()
    assert dataset.y_train.tolist() == [-1, -1, -1]
    assert not dataset.labelled and dataset.num_classes == 0 and dataset.class_names == ()
    assert dataset.x_test.shape == (0, 3, 16, 16)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.mkdir(), "holds no PNG or JPEG images"),
        (lambda p: (p / "x").mkdir(parents=True), "holds no PNG or JPEG images"),
        (
            lambda p: (
                _png(p / "loose.png", np.zeros((4, 4), np.uint8)),
                _png(p / "cls" / "in.png", np.zeros((4, 4), np.uint8)),
            ),
            "both images",
        ),
        (lambda p: (p.mkdir(), (p / "broken.png").write_bytes(b"not a png")), "broken.png"),
        (
            lambda p: (
                _png(p / "ok.png", np.zeros((9, 9), np.uint8)),
                (p / "cut.jpg").write_bytes(
                    _jpeg_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3)))[:300]
                ),
            ),
            "cut.jpg",
        ),
    ],
)
def test_bad_folders_give_one_sentence(tmp_path: Path, make: object, fragment: str) -> None:
    folder = tmp_path / "data"
    make(folder)  # type: ignore[operator]
    with pytest.raises(DataError, match=fragment) as caught:
        read_image_folder(folder, image_size=8)
    message = str(caught.value)
    assert message.endswith(".") and "\n" not in message


def _jpeg_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _fail(*_args: object, **_kwargs: object) -> np.ndarray:
    raise AssertionError("the cache should have been used")


def test_cache_is_used_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _labelled_folder(tmp_path / "data", np.random.default_rng(2))
    logs: list[str] = []
    first = read_image_folder(folder, image_size=8, log=logs.append)
    cache = folder / CACHE_DIR
    manifest = json.loads((cache / "images-8-rgb.json").read_text())
    assert manifest["shape"] == [5, 3, 8, 8] and set(manifest["sha256"]) == {"images", "labels"}
    assert not list(cache.glob("*.part"))
    with monkeypatch.context() as patch:
        patch.setattr(folder_module, "decode_image", _fail)
        again = read_image_folder(folder, image_size=8, log=logs.append)
        # Mapped from the cache, not read into memory.
        assert isinstance(again.images, np.memmap)
        assert np.array_equal(again.images, first.images)
        assert again.class_names == first.class_names and again.files == first.files
        # Another image size or channel mode is another cache.
        with pytest.raises(AssertionError):
            read_image_folder(folder, image_size=6)
    # A changed file (new mtime and content), an added one and a removed one each re-decode.
    target = folder / "ant" / "3.png"
    _png(target, np.zeros((32, 32), np.uint8))
    os.utime(target, ns=(1, 1))
    changed = read_image_folder(folder, image_size=8)
    assert changed.images[1].max() == 0 and first.images[1].max() > 0
    _png(folder / "zebra" / "c.png", np.zeros((9, 9), np.uint8))
    assert read_image_folder(folder, image_size=8).images.shape[0] == 6
    (folder / "ant" / "1.png").unlink()
    assert read_image_folder(folder, image_size=8).files[0] == "ant/3.png"


@pytest.mark.parametrize("damage", ["images", "manifest"])
def test_corrupt_cache_is_decoded_again(tmp_path: Path, damage: str) -> None:
    folder = _labelled_folder(tmp_path / "data", np.random.default_rng(3))
    first = read_image_folder(folder, image_size=8)
    cache = folder / CACHE_DIR
    if damage == "images":
        raw = bytearray((cache / "images-8-rgb.images.npy").read_bytes())
        raw[-1] ^= 0xFF
        (cache / "images-8-rgb.images.npy").write_bytes(bytes(raw))
    else:
        (cache / "images-8-rgb.json").write_text("{not json")
    logs: list[str] = []
    again = read_image_folder(folder, image_size=8, log=logs.append)
    assert np.array_equal(again.images, first.images)
    assert any("damaged" in line for line in logs), logs
    # And the rebuilt cache is good.
    assert any("using" in line for line in _reads(folder))


def _reads(folder: Path) -> list[str]:
    logs: list[str] = []
    read_image_folder(folder, image_size=8, log=logs.append)
    return logs


def test_read_only_folder_caches_under_the_root(tmp_path: Path) -> None:
    folder = _labelled_folder(tmp_path / "data", np.random.default_rng(4))
    (folder / CACHE_DIR).write_text("a file where the cache folder would go")
    root = tmp_path / "root"
    read_image_folder(folder, image_size=8, cache_root=root)
    assert list((root / "folder-cache").glob("*/images-8-rgb.json"))
    logs: list[str] = []
    read_image_folder(folder, image_size=8, cache_root=root, log=logs.append)
    assert any("folder-cache" in line and "using" in line for line in logs), logs


def test_npz_of_x_train_alone_is_unlabelled(tmp_path: Path) -> None:
    path = tmp_path / "u.npz"
    np.savez(path, x_train=np.zeros((7, 28, 28), np.uint8))
    dataset = load_dataset("npz", path=path)
    assert dataset.x_train.shape == (7, 3, 32, 32)
    assert dataset.y_train.tolist() == [-1] * 7 and not dataset.labelled
    assert dataset.x_test.shape == (0, 3, 32, 32)
    # Labelled files keep today's rules: y_train without the test arrays is still refused.
    np.savez(path, x_train=np.zeros((7, 28, 28), np.uint8), y_train=np.zeros(7, np.int64))
    with pytest.raises(DataError, match="has no array 'x_test'"):
        load_dataset("npz", path=path)


# --------------------------------------------------------------------------- real sites


def _sites(tmp_path: Path) -> list[Path]:
    """A labelled PNG folder (5 images), a labelled .npz (6) and an unlabelled .npz (4)."""
    rng = np.random.default_rng(5)
    folder = _labelled_folder(tmp_path / "site_a", rng)
    labelled = tmp_path / "site_b.npz"
    np.savez(
        labelled,
        x_train=_noise(rng, 6, 28, 28),
        y_train=np.array([0, 1, 2, 1, 0, 2]),
        x_test=_noise(rng, 2, 28, 28),
        y_test=np.array([0, 1]),
    )
    unlabelled = tmp_path / "site_c.npz"
    np.savez(unlabelled, x_train=_noise(rng, 4, 28, 28))
    return [folder, labelled, unlabelled]


def _clients_config(sites: list[str], *extra: str) -> list[str]:
    return [
        "data.name=folder",
        "data.partition=clients",
        f"data.clients={json.dumps(sites)}",
        f"federation.num_clients={len(sites)}",
        "data.train_subset=0",
        "data.test_subset=0",
        *extra,
    ]


def test_each_client_gets_exactly_its_own_images_in_order(tmp_path: Path) -> None:
    sites = _sites(tmp_path)
    cfg = load_config(SMOKE, overrides=_clients_config([str(p) for p in sites]))
    data = prepare_data(cfg, log=lambda _m: None)
    assert [p.tolist() for p in data.client_indices] == [
        [0, 1, 2, 3, 4],
        [5, 6, 7, 8, 9, 10],
        [11, 12, 13, 14],
    ]
    for k, site in enumerate(sites):
        own = load_site(site, image_size=32)
        index = torch.from_numpy(data.client_indices[k])
        assert torch.equal(data.dataset.x_train[index], own.x_train)
        assert torch.equal(data.dataset.y_train[index], own.y_train)
    assert data.federated_evaluation
    record = partition_record(cfg, data)
    assert record["sizes"] == [5, 6, 4] and record["labelled"] == [5, 6, 0]
    assert record["label_histogram"] == [[3, 2, 0], [2, 2, 2], [0, 0, 0]]


def test_a_node_reads_only_its_own_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sites = _sites(tmp_path)
    cfg = load_config(SMOKE, overrides=_clients_config([str(p) for p in sites]))
    whole = prepare_data(cfg, log=lambda _m: None)
    opened: list[str] = []
    original = np.load

    def spy(file: object, *args: object, **kwargs: object) -> object:
        opened.append(str(file))
        return original(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(np, "load", spy)
    node = node_data(cfg, 1, sites[1], log=lambda _m: None)
    assert opened and all("site_b" in name for name in opened), opened
    assert [len(p) for p in node.client_indices] == [0, 6, 0]
    own = torch.from_numpy(whole.client_indices[1])
    assert torch.equal(node.dataset.x_train, whole.dataset.x_train[own])
    assert node.augmentation().size == 32
    with pytest.raises(ConfigError, match=r"outside 0\.\.2"):
        node_data(cfg, 3, sites[1], log=lambda _m: None)


def test_relative_site_paths_resolve_against_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _sites(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SMOKE, overrides=_clients_config(["site_a/", "site_b.npz", "site_c.npz"]))
    assert cfg.data.clients == tuple(
        str(tmp_path / n) for n in ("site_a", "site_b.npz", "site_c.npz")
    )


def test_one_subfolder_per_client(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    base = tmp_path / "federation"
    _labelled_folder(base / "hospital_b", rng)
    for i in range(3):
        _png(base / "hospital_a" / f"{i}.png", _noise(rng, 20, 20))
    cfg = load_config(
        SMOKE,
        overrides=[
            "data.name=folder",
            "data.partition=clients",
            f"data.path={json.dumps(str(base))}",
            "federation.num_clients=2",
            "data.train_subset=0",
        ],
    )
    data = prepare_data(cfg, log=lambda _m: None)
    assert [len(p) for p in data.client_indices] == [3, 5]
    assert data.dataset.y_train[:3].tolist() == [-1, -1, -1]
    wrong = load_config(SMOKE, overrides=[*cfg_args(base), "federation.num_clients=3"])
    with pytest.raises(ConfigError, match=r"2 client datasets but federation\.num_clients is 3"):
        prepare_data(wrong, log=lambda _m: None)


def cfg_args(base: Path) -> list[str]:
    return [
        "data.name=folder",
        "data.partition=clients",
        f"data.path={json.dumps(str(base))}",
        "data.train_subset=0",
    ]


def test_site_list_problems(tmp_path: Path) -> None:
    sites = [str(p) for p in _sites(tmp_path)]
    with pytest.raises(ConfigError, match=r"lists 3 datasets but federation\.num_clients is 2"):
        load_config(SMOKE, overrides=[*_clients_config(sites), "federation.num_clients=2"])
    with pytest.raises(ConfigError, match=r"needs data\.partition = 'clients'"):
        load_config(SMOKE, overrides=[f"data.clients={json.dumps(sites)}"])
    missing = load_config(SMOKE, overrides=_clients_config([*sites[:2], str(tmp_path / "nowhere")]))
    with pytest.raises(DataError, match="nowhere does not exist"):
        prepare_data(missing, log=lambda _m: None)
    # A site whose images have another shape is refused in one sentence.
    odd = tmp_path / "odd.npz"
    np.savez(odd, x_train=np.zeros((3, 20, 20), np.uint8))
    mismatch = load_config(SMOKE, overrides=_clients_config([*sites[:2], str(odd)]))
    with pytest.raises(DataError, match="same image size"):
        prepare_data(mismatch, log=lambda _m: None)


def test_label_splits_of_unlabelled_data_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for i in range(30):
        _png(tmp_path / "flat" / f"{i:02d}.png", _noise(rng, 8, 8))
    base = ["data.name=folder", f"data.path={json.dumps(str(tmp_path / 'flat'))}"]
    base += ["data.train_subset=0", "data.test_subset=0", "federation.num_clients=3"]
    cfg = load_config(SMOKE, overrides=[*base, "data.partition=dirichlet"])
    with pytest.raises(ConfigError, match="use partition = 'clients' or 'iid'"):
        prepare_data(cfg, log=lambda _m: None)
    iid = prepare_data(
        load_config(SMOKE, overrides=[*base, "data.partition=iid"]), log=lambda _m: None
    )
    assert sorted(np.concatenate(iid.client_indices).tolist()) == list(range(30))
    assert iid.federated_evaluation
    record = partition_record(load_config(SMOKE, overrides=[*base, "data.partition=iid"]), iid)
    assert record["labelled"] == [0, 0, 0] and record["label_histogram"] == [[], [], []]
