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
