"""The composition layer: preflight checks, data views, augmentation size, output files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedssd.api import FederatedData, check_setup, load_config
from fedssd.config import EvaluationConfig
from fedssd.data.augment import SSL_AUGMENT
from fedssd.data.datasets import ImageDataset
from fedssd.errors import ConfigError, DataError
from fedssd.federation.evaluate import evaluate_model
from fedssd.outputs import check_run_dir, prepare_run_dir

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


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
