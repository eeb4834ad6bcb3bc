"""A simulated federation of real sites: training, the server's evaluation set, and the federated
evaluation each client computes on its own images."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import fedssd
from fedssd.cli import main
from fedssd.config import EvaluationConfig
from fedssd.data.augment import SSL_AUGMENT
from fedssd.data.datasets import load_dataset
from fedssd.data.federated import server_evaluation_views
from fedssd.evaluation.metrics import representation_metrics
from fedssd.federation.evaluate import (
    CLIENT_METRICS,
    client_evaluation,
    combine_client_evaluations,
    view_alignment,
)
from fedssd.runs.model import make_model
from fedssd.runs.resolve import load_config
from helpers import one_sentence

TINY = {
    "seed": 3,
    "device": "cpu",
    "data": {"name": "folder", "partition": "clients"},
    "model": {"encoder": "small_cnn", "width": 8, "projector_hidden": 32},
    "method": {"name": "ssd"},
    "federation": {
        "num_clients": 3,
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 32,
        "lr": 0.05,
    },
    "evaluation": {
        "every": 1,
        "knn_k": 10,
        "linear_epochs": 3,
        "metrics_samples": 64,
        "metrics_per_client": 32,
    },
    "checkpoint": {"every": 0},
}


@pytest.fixture(scope="module")
def fashion() -> Any:
    return load_dataset("fashion_mnist", download=False, pad_to_32=False, rgb=False)


def _take(labels: torch.Tensor, classes: list[int], count: int) -> np.ndarray:
    index = np.flatnonzero(np.isin(labels.numpy(), classes))
    return index[:count]


@pytest.fixture(scope="module")
def sites(fashion: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Site 0: a labelled .npz of classes 0-2; site 1: a folder of PNG files of classes 3-5
    without labels; site 2: an unlabelled .npz of classes 6-9; and the server's labelled set
    of Fashion-MNIST test images."""
    base = tmp_path_factory.mktemp("sites")
    x, y = fashion.x_train[:, 0].numpy(), fashion.y_train
    first = _take(y, [0, 1, 2], 90)
    np.savez(
        base / "site_a.npz",
        x_train=x[first[:80]],
        y_train=y.numpy()[first[:80]],
        x_test=x[first[80:]],
        y_test=y.numpy()[first[80:]],
    )
    folder = base / "site_b"
    folder.mkdir()
    for i, index in enumerate(_take(y, [3, 4, 5], 60)):
        Image.fromarray(x[index]).save(folder / f"img{i:03d}.png")
    np.savez(base / "site_c.npz", x_train=x[_take(y, [6, 7, 8, 9], 70)])
    server = base / "server_eval.npz"
    np.savez(
        server,
        x_train=fashion.x_test[:150, 0].numpy(),
        y_train=fashion.y_test[:150].numpy(),
    )
    return {
        "a": base / "site_a.npz",
        "b": folder,
        "c": base / "site_c.npz",
        "server": server,
    }


def _config(sites: dict[str, Path], **evaluation: Any) -> dict[str, Any]:
    raw = json.loads(json.dumps(TINY))
    raw["data"]["clients"] = [str(sites[k]) for k in "abc"]
    raw["evaluation"].update(evaluation)
    return raw


def _hand_mean(per_client: dict[str, dict[str, float]], key: str, weight: str) -> float:
    pairs = [(c[key], c[weight]) for c in per_client.values() if key in c]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def test_federated_evaluation_run(sites: dict[str, Path], tmp_path: Path) -> None:
    logs: list[str] = []
    result = fedssd.train(fedssd.config.load(_config(sites)), out=tmp_path / "run", log=logs.append)
    out = tmp_path / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"] == "federated" and summary["clients_evaluated"] == 3
    per_client = summary["federated"]["per_client"]
    assert [per_client[k]["num_samples"] for k in "012"] == [80, 60, 70]
    # Only the labelled client has a kNN accuracy (16 of its 80 images held out).
    assert "knn_acc" in per_client["0"] and per_client["0"]["knn_queries"] == 16
    assert "knn_acc" not in per_client["1"] and "knn_acc" not in per_client["2"]
    for key in CLIENT_METRICS:
        assert summary[key] == pytest.approx(_hand_mean(per_client, key, "num_samples"))
    assert summary["knn_acc"] == pytest.approx(per_client["0"]["knn_acc"])
    assert "linear_probe_acc" not in summary
    # No server-side set: the kNN monitor is off, said once.
    assert sum("kNN monitor is off" in line for line in logs) == 1
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all("knn_acc" not in record for record in history)
    partition = json.loads((out / "partition.json").read_text())
    assert partition["scheme"] == "clients" and partition["sizes"] == [80, 60, 70]
    assert partition["labelled"] == [80, 0, 0]
    assert sum(partition["label_histogram"][0]) == 80
    assert result.summary["num_samples"] == 210
    # No labelled set in one place: re-evaluating needs one, said in one sentence.
    from fedssd.experiments.evaluate import evaluate_run

    with pytest.raises(fedssd.errors.ConfigError, match="--eval-data"):
        evaluate_run(out, "knn", log=None)


def test_server_evaluation_set_run(sites: dict[str, Path], tmp_path: Path) -> None:
    raw = _config(sites, data=str(sites["server"]))
    result = fedssd.train(fedssd.config.load(raw), out=tmp_path / "run", log=None)
    summary = result.summary
    for key in ("knn_acc", "linear_probe_acc", "uniformity_global", "alignment", "effective_rank"):
        assert isinstance(summary[key], float), key
    assert "federated" not in summary
    history = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(0 <= record["knn_acc"] <= 1 for record in history)
    # The server's views: a stratified 80/20 split of its 150 labelled images, no client data.
    cfg = load_config(fedssd.config.load(raw))
    views = server_evaluation_views(cfg, log=lambda _m: None)
    assert views is not None
    assert views.train_images.shape == (120, 3, 32, 32) and views.test_images.shape[0] == 30
    assert views.num_classes == 10


def test_client_evaluation_matches_the_project_metrics() -> None:
    cfg = load_config(fedssd.config.load(json.loads(json.dumps(TINY)) | {"data": {}}))
    model = make_model(cfg, 1, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 1, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(50) % 3
    settings = EvaluationConfig(metrics_samples=40, knn_k=5)
    augment = dataclasses.replace(SSL_AUGMENT, size=16)
    result = client_evaluation(
        model,
        images,
        labels,
        settings=settings,
        augment=augment,
        seed=11,
        device=torch.device("cpu"),
    )
    model.eval()
    with torch.no_grad():
        h, z = model(images.float() / 255)
    for suffix, features in (("", h), ("_z", z)):
        reference = representation_metrics(
            features, torch.zeros(50, dtype=torch.long), max_samples=40, seed=11
        )
        assert result[f"uniformity{suffix}"] == pytest.approx(
            reference["uniformity_global"], abs=1e-5
        )
        assert result[f"effective_rank{suffix}"] == pytest.approx(
            reference["effective_rank"], rel=1e-4
        )
    sample = torch.randperm(50, generator=torch.Generator().manual_seed(11))[:40]
    views_generator = torch.Generator().manual_seed(11)
    align = view_alignment(
        model,
        images[sample],
        augment=augment,
        generator=views_generator,
        batch_size=1024,
        device=torch.device("cpu"),
    )
    assert (result["alignment"], result["alignment_z"]) == pytest.approx(align)
    assert result["num_samples"] == 50 and result["knn_queries"] == 10
    assert 0 <= result["knn_acc"] <= 1
    # Unlabelled: no kNN.
    unlabelled = client_evaluation(
        model, images, None, settings=settings, augment=augment, seed=11, device=torch.device("cpu")
    )
    assert "knn_acc" not in unlabelled and unlabelled["uniformity"] == result["uniformity"]


def test_combine_weights_by_samples_and_queries() -> None:
    combined = combine_client_evaluations(
        {
            2: {"num_samples": 30.0, "uniformity": 1.0, "knn_acc": 0.5, "knn_queries": 10.0},
            0: {"num_samples": 10.0, "uniformity": 3.0, "knn_acc": 1.0, "knn_queries": 30.0},
            1: {"num_samples": 60.0, "uniformity": 2.0},
        }
    )
    assert combined["uniformity"] == pytest.approx((30 * 1 + 10 * 3 + 60 * 2) / 100)
    assert combined["knn_acc"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert combined["knn_queries"] == 40 and combined["num_samples"] == 100
    assert combined["alignment"] is None
    assert list(combined["federated"]["per_client"]) == ["0", "1", "2"]


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, err.getvalue()


def test_cli_trains_sites_and_refuses_a_missing_one(sites: dict[str, Path], tmp_path: Path) -> None:
    import tomli_w

    config = tmp_path / "sites.toml"
    raw = _config(sites)
    raw["federation"]["rounds"] = 1
    config.write_text(tomli_w.dumps(raw))
    code, err = _cli(["train", "--config", str(config), "--quiet", "--out", str(tmp_path / "ok")])
    assert code == 0, err
    assert (tmp_path / "ok" / "summary.json").is_file()
    raw["data"]["clients"][1] = str(tmp_path / "no_such_site")
    config.write_text(tomli_w.dumps(raw))
    code, err = _cli(["train", "--config", str(config), "--quiet", "--out", str(tmp_path / "bad")])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no_such_site does not exist" in lines[0], err
    assert lines[0].endswith(".")
    assert not (tmp_path / "bad").exists()


def test_server_sets_named_folder_and_refused(sites: dict[str, Path], tmp_path: Path) -> None:
    raw = _config(sites, data="fashion_mnist")
    cfg = load_config(fedssd.config.load(raw))
    assert cfg.evaluation.data == "fashion_mnist"  # a name stays a name, a path becomes absolute
    views = server_evaluation_views(cfg, log=lambda _m: None)
    assert views is not None and views.num_classes == 10
    # The official test split, stratified 80/20: 800 and 200 images of each class.
    assert torch.bincount(views.train_labels).tolist() == [800] * 10
    assert torch.bincount(views.test_labels).tolist() == [200] * 10
    assert views.train_images.shape[1:] == (3, 32, 32)
    folder = tmp_path / "eval"
    for label in ("cat", "dog"):
        for i in range(5):
            (folder / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 40), 40 * i, np.uint8)).save(folder / label / f"{i}.png")
    views = server_evaluation_views(
        load_config(fedssd.config.load(_config(sites, data=str(folder)))), log=lambda _m: None
    )
    assert views is not None and views.num_classes == 2
    assert views.train_images.shape[0] == 8 and views.test_labels.tolist() == [0, 1]
    unlabelled = load_config(fedssd.config.load(_config(sites, data=str(sites["c"]))))
    with pytest.raises(fedssd.errors.DataError, match="has no labels"):
        server_evaluation_views(unlabelled, log=lambda _m: None)
    assert (
        server_evaluation_views(load_config(fedssd.config.load(_config(sites))), log=print) is None
    )


@pytest.mark.slow
def test_a_deployment_run_is_evaluated_and_exported_from_its_folder(
    sites: dict[str, Path], fashion: Any, tmp_path: Path
) -> None:
    """The server of a deployment holds none of the sites' images and its config names none:
    ``fedssd eval`` needs a labelled set (said in one sentence) and works with one, and the
    export card gives the images' size, both from the shape ``partition.json`` records."""
    from fedssd import config as config_module
    from fedssd.encoders import export_encoder
    from fedssd.experiments.evaluate import evaluate_run

    raw = _config(sites)
    raw["federation"]["rounds"] = 1
    run = tmp_path / "run"
    fedssd.train(fedssd.config.load(raw), out=run, log=None)
    del raw["data"]["clients"]  # as the coordinator's config.toml has it
    (run / "config.toml").write_text(config_module.dumps(load_config(fedssd.config.load(raw))))
    assert json.loads((run / "partition.json").read_text())["image_shape"] == [3, 32, 32]
    with pytest.raises(fedssd.errors.ConfigError, match="--eval-data folder") as refused:
        evaluate_run(run, "knn", log=None)
    assert one_sentence(str(refused.value))
    labelled = tmp_path / "labelled"
    for label in range(3):
        (labelled / str(label)).mkdir(parents=True)
        for i in np.flatnonzero(fashion.y_test.numpy() == label)[:10]:
            image = fashion.x_test[i, 0].numpy()
            Image.fromarray(image).save(labelled / str(label) / f"{i}.png")
    result = evaluate_run(run, "knn", eval_data="folder", eval_path=str(labelled), log=None)
    assert 0 <= result["knn_acc"] <= 1 and result["train_images"] + result["test_images"] == 30
    _, card_path = export_encoder(run, "safetensors")
    card = json.loads(card_path.read_text())
    assert card["input"]["size"] == 32 and card["input"]["shape"] == ["batch", 3, 32, 32]
    # A run folder from before the shape was recorded: one sentence, not a search for the sites.
    partition = json.loads((run / "partition.json").read_text())
    del partition["image_shape"]
    (run / "partition.json").write_text(json.dumps(partition))
    with pytest.raises(fedssd.errors.DataError, match="image_shape") as unknown:
        evaluate_run(run, "knn", eval_data="folder", eval_path=str(labelled), log=None)
    assert one_sentence(str(unknown.value))
