"""The composition layer: preflight checks, data views, augmentation size, output files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedssd.config import Config, EvaluationConfig
from fedssd.data.augment import SSL_AUGMENT
from fedssd.data.datasets import ImageDataset
from fedssd.data.federated import FederatedData
from fedssd.errors import ConfigError, DataError
from fedssd.experiment import check_setup
from fedssd.federation import callbacks
from fedssd.federation.evaluate import evaluate_model
from fedssd.runs.outputs import check_run_dir, prepare_run_dir
from fedssd.runs.resolve import load_config

SMOKE = Path(__file__).resolve().parents[1] / "src" / "fedssd" / "configs" / "smoke.toml"


def dataset(height: int, width: int, n: int = 12) -> ImageDataset:
    images = torch.zeros(n, 3, height, width, dtype=torch.uint8)
    labels = torch.arange(n) % 3
    return ImageDataset("npz", images, labels, images[:4], labels[:4], num_classes=3)


def test_views_are_made_at_the_images_own_size() -> None:
    data = FederatedData(dataset(16, 16), [np.arange(6), np.arange(6, 12)], np.arange(4))
    assert data.augmentation().size == 16
    assert data.augmentation().crop_scale == SSL_AUGMENT.crop_scale
    with pytest.raises(DataError, match="square"):
        FederatedData(dataset(16, 20), [np.arange(12)], np.arange(4)).augmentation()


def test_evaluation_views_keep_each_images_owner() -> None:
    data = FederatedData(dataset(8, 8), [np.array([5, 1]), np.array([0, 7])], np.arange(2))
    views = data.evaluation_views()
    assert views.train_clients.tolist() == [1, 0, 0, 1]  # images 0, 1, 5, 7
    assert views.train_labels.tolist() == [0, 1, 2, 1]
    assert views.test_images.shape[0] == 2 and views.num_classes == 3


@pytest.mark.parametrize(
    ("override", "fragment"),
    [("model.encoder=vgg", "encoder"), ("model.projector_out=7", "projector distillation")],
)
def test_setup_problems_are_found_before_any_data_is_read(override: str, fragment: str) -> None:
    cfg = load_config(SMOKE, overrides=[override, "data.name=cifar10", "data.download=false"])
    with pytest.raises(ConfigError, match=fragment):
        check_setup(cfg)


def test_a_cli_run_parses_its_config_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI reads the file into a Config; train() checks and resolves that Config as it is."""
    import fedssd.api
    from fedssd import config as config_module
    from fedssd.cli import main

    parsed: list[object] = []
    load = config_module.load

    def counting(*args: Any, **kwargs: Any) -> Config:
        parsed.append(args[0])
        return load(*args, **kwargs)

    class Built(Exception):
        pass

    def stop(*_args: object, **_kwargs: object) -> None:
        raise Built

    monkeypatch.setattr(config_module, "load", counting)
    monkeypatch.setattr(fedssd.api, "build_experiment", stop)
    with pytest.raises(Built):
        main(["train", "--config", str(SMOKE), "--out", str(tmp_path / "run"), "--quiet"])
    assert len(parsed) == 1, parsed


def test_output_folder_checks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "server_state.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir(run, overwrite=False)
    prepare_run_dir(run, overwrite=True)
    assert not (run / "server_state.safetensors").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not a folder"):
        check_run_dir(blocker, overwrite=False)
    with pytest.raises(ConfigError, match="cannot write to output folder"):
        prepare_run_dir(blocker / "sub", overwrite=False)


class SplitModel(nn.Module):
    """h carries the class; z is the same for every image."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        label = (x[:, 0, 0, 0] * 2).round().long()  # pixel 0, 128 or 255 -> class 0, 1, 2
        h = nn.functional.one_hot(label, 3).float() * 5 + 0.01 * x[:, 0, 1, :3]
        return h, torch.ones(x.shape[0], 3)


def test_summary_evaluates_the_encoder_output_h() -> None:
    """kNN and the linear probe read h (raw), not the projector output z."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (60,), generator=g)
    images = torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8, generator=g)
    images[:, 0, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)[labels]
    settings = EvaluationConfig(
        knn_k=5, linear_epochs=100, linear_lr=0.05, metrics_samples=40, metrics_per_client=20
    )
    summary = evaluate_model(
        SplitModel(),
        train_images=images[:40],
        train_labels=labels[:40],
        train_clients=torch.arange(40) % 2,
        test_images=images[40:],
        test_labels=labels[40:],
        num_classes=3,
        settings=settings,
        augment=SSL_AUGMENT,
        seed=0,
        device=torch.device("cpu"),
        log=lambda _m: None,
    )
    assert summary["knn_acc"] == 1.0
    assert summary["linear_probe_acc"] == 1.0
    assert summary["uniformity_global_z"] == pytest.approx(0.0, abs=1e-6)  # z is one point
    assert summary["uniformity_global"] > 1.0


# ----------------------------------------------------------------------------- issue 17

TINY = [
    "data.train_subset=300",
    "data.test_subset=150",
    "federation.rounds=1",
    "evaluation.linear_epochs=3",
    "evaluation.metrics_samples=200",
    "evaluation.metrics_per_client=40",
]


def test_dir_and_help_show_the_public_api() -> None:
    import pydoc

    import fedssd

    for name in ("train", "resume", "load_config", "load_run", "Config", "RunResult"):
        assert name in dir(fedssd), name
        assert name in fedssd.__all__, name
    text = pydoc.render_doc(fedssd, renderer=pydoc.plaintext)
    assert "train(" in text and "load_config(" in text and "load_run(" in text


def test_load_config_overrides_are_keyword_only_like_train() -> None:
    with pytest.raises(TypeError):
        load_config(SMOKE, ["federation.rounds=3"])  # type: ignore[misc]
    assert load_config(SMOKE, overrides=["federation.rounds=3"]).federation.rounds == 3


def test_load_run_is_public(tmp_path: Path) -> None:
    import fedssd
    from fedssd.runs.model import load_run

    assert fedssd.load_run is load_run
    result = fedssd.train(SMOKE, overrides=TINY, out=tmp_path / "run", log=None)
    config, model = fedssd.load_run(str(tmp_path / "run"))
    assert config == result.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, result.model.state_dict()[key]), key


@pytest.mark.slow
def test_threads_apply_during_the_run_and_are_restored(tmp_path: Path) -> None:
    import fedssd
    import fedssd.experiment as session

    assert torch.get_num_threads() == 1  # tests/conftest.py
    seen: list[int] = []
    original = session.round_callbacks

    def patched(*args: object, **kwargs: object) -> list[object]:
        def spy(_record: object, _model: object) -> None:
            seen.append(torch.get_num_threads())

        return [*original(*args, **kwargs), spy]  # type: ignore[arg-type]

    lines: list[str] = []
    session.round_callbacks = patched  # type: ignore[assignment]
    try:
        two = fedssd.train(SMOKE, overrides=[*TINY, "threads=2"], out=None, log=lines.append)
    finally:
        session.round_callbacks = original  # type: ignore[assignment]
    assert seen == [2]
    assert torch.get_num_threads() == 1
    assert any("(2 CPU threads, " in line for line in lines)
    # The same thread count gives the same weights whether it is set by the config or not.
    one = fedssd.train(SMOKE, overrides=[*TINY, "threads=1"], out=None, log=None)
    default = fedssd.train(SMOKE, overrides=TINY, out=None, log=None)
    for key, value in one.model.state_dict().items():
        assert torch.equal(value, default.model.state_dict()[key]), key
    assert two.config.threads == 2 and default.config.threads == 0
    assert (two.summary["threads"], default.summary["threads"]) == (2, 1)


def test_the_linear_probe_can_be_switched_off(tmp_path: Path) -> None:
    import json

    import fedssd
    from fedssd.experiments.tables import format_table

    result = fedssd.train(
        SMOKE, overrides=[*TINY, "evaluation.linear_epochs=0"], out=tmp_path / "run", log=None
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["linear_probe_acc"] is None and summary["linear_probe_train_acc"] is None
    assert 0 < summary["knn_acc"] <= 1
    assert "| n/a |" in format_table({"ssd": result.summary})


def test_labels_of_one_class_are_warned_about(tmp_path: Path) -> None:
    import fedssd

    rng = np.random.default_rng(0)
    path = tmp_path / "one.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8),
        y_train=np.zeros(120, dtype=np.int64),
        x_test=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
        y_test=np.zeros(40, dtype=np.int64),
    )
    lines: list[str] = []
    overrides = [
        "data.name=npz",
        f"data.path={path}",
        "data.partition=iid",
        "federation.num_clients=2",
        "federation.rounds=1",
        "evaluation.every=0",
        "evaluation.knn_k=5",
        "evaluation.linear_epochs=2",
        "evaluation.metrics_samples=50",
        "evaluation.metrics_per_client=20",
    ]
    fedssd.train(SMOKE, overrides=overrides, out=None, log=lines.append)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, lines
    assert "one class" in warnings[0] and "measure nothing" in warnings[0]


def test_the_time_left_of_a_resumed_run_counts_only_its_own_rounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    report = callbacks.progress("ssd", 10, lines.append)
    # Resumed after round 4: rounds 5 and 6 take 10 s each, leaving 5, then 4, rounds of 10 s.
    for done in (5, 6):
        report({"round": done, "loss": 0.5, "seconds": 10.0}, None)  # type: ignore[arg-type]
    assert lines[0].endswith("eta 50s") and lines[1].endswith("eta 40s"), lines
