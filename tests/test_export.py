"""Trained encoders out and in (issue 15): fedssd export, fedssd.load_encoder, model.init_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fedssd
from fedssd.cli import main
from fedssd.encoders import export_encoder
from fedssd.runs.model import load_run

SMOKE = Path(__file__).resolve().parents[1] / "src" / "fedssd" / "configs" / "smoke.toml"
TINY = [
    "data.train_subset=300",
    "data.test_subset=100",
    "federation.rounds=1",
    "evaluation.linear_epochs=2",
    "evaluation.metrics_samples=100",
    "evaluation.metrics_per_client=50",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    fedssd.train(SMOKE, overrides=TINY, out=out, log=None)
    return out


def _images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_torchscript_gives_the_runs_features(run: Path, tmp_path: Path) -> None:
    _, model = load_run(run)
    path, card_path = export_encoder(run, "torchscript", out=tmp_path / "enc.pt")
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(_images()), model.encoder(_images()), atol=1e-5)
    card = json.loads(card_path.read_text())
    assert card["input"]["size"] == 32 and card["input"]["channels"] == 3
    assert card["input"]["value_range"] == [0.0, 1.0]
    assert card["feature_dim"] == model.feature_dim and card["method"] == "ssd"
    assert card["data"]["name"] == "fashion_mnist"
    summary = json.loads((run / "summary.json").read_text())
    assert card["summary"]["knn_acc"] == summary["knn_acc"]


def test_onnx_with_projector_gives_the_runs_features(run: Path, tmp_path: Path) -> None:
    import onnxruntime

    _, model = load_run(run)
    path, _ = export_encoder(run, "onnx", projector=True, out=tmp_path / "enc.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = _images(5)  # another batch size than the export's: the batch axis is dynamic
    h, z = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        want_h, want_z = model(images)
    assert torch.allclose(torch.from_numpy(h), want_h, atol=1e-4)
    assert torch.allclose(torch.from_numpy(z), want_z, atol=1e-4)


def test_safetensors_export_and_load_encoder(run: Path, tmp_path: Path) -> None:
    _, model = load_run(run)
    assert (
        main(
            [
                "export",
                str(run),
                "--format",
                "safetensors",
                "--out",
                str(tmp_path / "e.st.safetensors"),
            ]
        )
        == 0
    )
    for source in (run, tmp_path / "e.st.safetensors"):
        encoder = fedssd.load_encoder(source)
        assert not encoder.training
        with torch.no_grad():
            assert torch.equal(encoder(_images()), model.encoder(_images()))
    with pytest.raises(fedssd.errors.DataError, match="holds no projector"):
        fedssd.load_encoder(tmp_path / "e.st.safetensors", projector=True)
    both = fedssd.load_encoder(run, projector=True)
    with torch.no_grad():
        h, z = both(_images())
        assert torch.equal(h, model.encoder(_images()))
        assert torch.equal(z, model(_images())[1])


@pytest.mark.slow
def test_warm_start_copies_the_encoder_and_a_mismatch_is_one_sentence(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, trained = load_run(run)
    cfg = fedssd.load_config(SMOKE, overrides=[*TINY, f"model.init_from={str(run)!r}"])
    from fedssd.experiment import build_experiment, warm_start

    experiment = build_experiment(cfg, log=lambda _m: None)
    warm_start(experiment, log=lambda _m: None)
    own = experiment.global_model.state_dict()
    for key, value in trained.state_dict().items():
        if key.startswith("encoder."):
            assert torch.equal(own[key], value), key
    # The projector keeps the seed's initialisation unless asked for.
    fresh = build_experiment(fedssd.load_config(SMOKE, overrides=TINY), log=lambda _m: None)
    key = next(k for k in own if k.startswith("projector."))
    assert torch.equal(own[key], fresh.global_model.state_dict()[key])

    out = tmp_path / "bad"
    code = main(
        [
            "train",
            "--config",
            str(SMOKE),
            "--out",
            str(out),
            "--quiet",
            *(x for item in TINY for x in ("--set", item)),
            "--set",
            "model.width=16",
            "--set",
            f"model.init_from={str(run)!r}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "shape" in err
    assert not out.exists()
    code = main(
        ["train", "--config", str(SMOKE), "--out", str(out), "--set", "model.init_from=/nope"]
    )
    assert code == 2 and "neither a finished run folder" in capsys.readouterr().err


def test_the_card_of_a_folder_run_gives_the_image_size() -> None:
    from fedssd import config as config_module
    from fedssd.encoders import input_size

    folder = config_module.load({"data": {"name": "folder", "path": "x", "image_size": 96}})
    assert input_size(folder) == 96
    assert input_size(config_module.load({"data": {"name": "cifar10"}})) == 32
    assert input_size(config_module.load({"data": {"name": "npz", "path": "x.npz"}})) is None


@pytest.mark.slow
def test_a_photo_run_at_64_px_starts_from_torchvision_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ImageNet-stem ResNet on 64x64 photos, started from a torchvision-named file: the run
    trains, its card gives the size, and a file of another width is refused in one sentence
    before the run folder exists."""
    import numpy as np
    import tomli_w
    from PIL import Image
    from tests.models.test_pretrained import torchvision_state

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        for i in range(24):
            pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / label / f"{i}.png")
    torch.save(torchvision_state("resnet18", width=4), tmp_path / "resnet18.pth")
    torch.save(torchvision_state("resnet18", width=8), tmp_path / "wide.pth")
    raw = {
        "seed": 3,
        "data": {"name": "folder", "path": str(tmp_path / "photos"), "partition": "iid"},
        "model": {"encoder": "resnet18_imagenet", "width": 4, "projector_hidden": 32},
        "federation": {"num_clients": 2, "rounds": 1, "local_epochs": 1, "batch_size": 16},
        "evaluation": {
            "knn_k": 5,
            "linear_epochs": 2,
            "metrics_samples": 40,
            "metrics_per_client": 20,
        },
    }
    config = tmp_path / "photos.toml"
    config.write_text(tomli_w.dumps(raw))
    sets = ["--set", "data.image_size=64", "--quiet"]
    out = tmp_path / "run"
    start = ["train", "--config", str(config), "--out", str(out), *sets, "--set"]
    assert main([*start, f"model.init_from={str(tmp_path / 'resnet18.pth')!r}"]) == 0
    _, card_path = export_encoder(out, "safetensors")
    card = json.loads(card_path.read_text())
    assert card["input"]["shape"] == ["batch", 3, 64, 64] and card["feature_dim"] == 32
    capsys.readouterr()
    refused = tmp_path / "refused"
    start[4] = str(refused)
    assert main([*start, f"model.init_from={str(tmp_path / 'wide.pth')!r}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds conv1.weight of shape (8, 3, 7, 7)" in err, err
    assert "fit model.encoder = 'resnet18_imagenet' with model.width = 8." in err
    assert not refused.exists()
