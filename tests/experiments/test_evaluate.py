"""Re-evaluation of finished runs: loading, the three protocols, transfer and the CLI glue."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import fedssd
from fedssd.cli import add_eval_parser, run_eval
from fedssd.data.augment import SSL_AUGMENT
from fedssd.data.federated import prepare_data
from fedssd.errors import ConfigError, DataError
from fedssd.evaluation import extract_features, knn_accuracy
from fedssd.evaluation.finetune import stratified_fraction
from fedssd.experiment import final_evaluation
from fedssd.experiments.evaluate import evaluate_run, result_name
from fedssd.runs.model import load_run

SMOKE = Path(__file__).resolve().parents[2] / "src" / "fedssd" / "configs" / "smoke.toml"


def _write_npz(path: Path, *, side: int, train: int = 60, test: int = 30, seed: int = 0) -> Path:
    """Five classes of random images, balanced and in class order (labels ``i % 5``)."""
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (train, side, side, 3), dtype=np.uint8),
        y_train=np.arange(train) % 5,
        x_test=rng.integers(0, 256, (test, side, side, 3), dtype=np.uint8),
        y_test=np.arange(test) % 5,
    )
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny finished run (the smoke config, one round) on a 32x32 npz dataset."""
    folder = tmp_path_factory.mktemp("protocols")
    source = _write_npz(folder / "source.npz", side=32, train=500, test=200, seed=1)
    overrides = [
        "device=cpu",
        "data.name=npz",
        f"data.path={source}",
        "data.train_subset=200",
        "data.test_subset=100",
        "federation.rounds=1",
        "evaluation.every=0",
        "evaluation.linear_epochs=5",
    ]
    fedssd.train(SMOKE, overrides=overrides, out=folder / "run", log=None)
    return folder / "run"


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.toml", "model.safetensors"):
        shutil.copy(run_dir / name, copy / name)
    return copy


def test_linear_and_knn_give_the_final_evaluations_numbers(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    linear = evaluate_run(run_dir, "linear", log=None)
    knn = evaluate_run(run_dir, "knn", log=None)
    # The same features, probe seed and sample as the run's own final evaluation.
    assert linear["linear_probe_acc"] == pytest.approx(summary["linear_probe_acc"], abs=1e-9)
    assert linear["uniformity_global"] == pytest.approx(summary["uniformity_global"], rel=1e-6)
    assert linear["effective_rank"] == pytest.approx(summary["effective_rank"], rel=1e-6)
    assert knn["knn_acc"] == pytest.approx(summary["knn_acc"], abs=1e-9)
    # And the same as final_evaluation called on the reloaded model.
    config, model = load_run(run_dir)
    views = prepare_data(config, log=lambda _m: None).evaluation_views()
    again = final_evaluation(
        config, views, model, augment=SSL_AUGMENT, device=torch.device("cpu"), log=lambda _m: None
    )
    assert linear["linear_probe_acc"] == pytest.approx(again["linear_probe_acc"], abs=1e-9)
    assert knn["knn_acc"] == pytest.approx(again["knn_acc"], abs=1e-9)
    assert json.loads((run_dir / "eval" / "linear.json").read_text()) == linear
    assert json.loads((run_dir / "eval" / "knn.json").read_text()) == knn
    assert linear["train_images"] == 200 and linear["test_images"] == 100
    assert linear["eval_data"] is None and linear["trained_on"] == "npz"


def test_finetune_result_is_written_and_reproducible(run_dir: Path) -> None:
    result = evaluate_run(run_dir, "finetune", labels=0.1, epochs=3, log=None)
    # 10% of the 200-image stratified pool (40 per class) is 4 per class.
    assert result["labelled_images"] == 20 and result["labels"] == 0.1
    assert [epoch for epoch, _ in result["finetune_evaluations"]] == [3]
    assert result["finetune_best_acc"] >= result["finetune_last_acc"]
    assert 0.0 <= result["finetune_last_acc"] <= 1.0
    written = json.loads((run_dir / "eval" / "finetune-0.1-3ep.json").read_text())
    assert written == result
    again = evaluate_run(run_dir, "finetune", labels=0.1, epochs=3, log=None)
    assert again["finetune_evaluations"] == result["finetune_evaluations"]


@pytest.mark.parametrize(
    ("protocol", "options", "fragment"),
    [
        ("svm", {}, "Unknown protocol"),
        ("finetune", {}, "labelled fraction"),
        ("finetune", {"labels": 0.05}, "labelled fraction"),
        ("linear", {"labels": 0.1}, "only with finetune"),
        ("knn", {"epochs": 3}, "kNN has none"),
        ("linear", {"epochs": 0}, "positive"),
        ("knn", {"eval_data": "imagenet"}, "Unknown evaluation dataset"),
        ("knn", {"eval_path": "x.npz"}, "without an evaluation dataset"),
        ("knn", {"eval_data": "npz"}, "needs eval_path"),
    ],
)
def test_impossible_requests_are_refused_before_reading(
    tmp_path: Path, protocol: str, options: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        evaluate_run(tmp_path / "no-run", protocol, log=None, **options)


def test_transfer_to_another_dataset(run_dir: Path, tmp_path: Path) -> None:
    npz = _write_npz(tmp_path / "other.npz", side=32)
    result = evaluate_run(run_dir, "knn", eval_data="npz", eval_path=str(npz), log=None)
    assert (run_dir / "eval" / "knn-on-npz-other.json").is_file()
    assert result["eval_data"] == "npz" and result["train_images"] == 60
    # By hand: the reloaded model's features of the npz images, kNN with the run's k and t.
    _, model = load_run(run_dir)
    with np.load(npz) as stored:
        train_x = torch.from_numpy(stored["x_train"]).permute(0, 3, 1, 2).contiguous()
        test_x = torch.from_numpy(stored["x_test"]).permute(0, 3, 1, 2).contiguous()
        train_y = torch.from_numpy(stored["y_train"]).long()
        test_y = torch.from_numpy(stored["y_test"]).long()
    bank, _ = extract_features(model, train_x)
    queries, _ = extract_features(model, test_x)
    expected = knn_accuracy(bank, train_y, queries, test_y, num_classes=5, k=20, temperature=0.1)
    assert result["knn_acc"] == pytest.approx(expected, abs=1e-9)
    tuned = evaluate_run(
        run_dir, "finetune", labels=0.1, eval_data="npz", eval_path=str(npz), epochs=1, log=None
    )
    # 10% of 12 images per class is 1.2 each: 6 in all, the sixth to class 0 by class order.
    assert tuned["labelled_images"] == 6
    assert tuned["labelled_images"] == len(
        stratified_fraction(train_y.numpy(), 0.1, np.random.default_rng(0))
    )
    assert (run_dir / "eval" / "finetune-0.1-1ep-on-npz-other.json").is_file()


def test_transfer_to_images_of_another_size_is_refused(run_dir: Path, tmp_path: Path) -> None:
    npz = _write_npz(tmp_path / "small.npz", side=24)
    with pytest.raises(DataError, match="24x24 but the model was trained on 32x32"):
        evaluate_run(run_dir, "linear", eval_data="npz", eval_path=str(npz), log=None)


def test_damaged_model_files_are_refused(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy_run(run_dir, tmp_path)
    model_file = copy / "model.safetensors"
    state = load_file(run_dir / "model.safetensors")
    model_file.write_bytes((run_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(DataError, match="damaged or truncated"):
        load_run(copy)
    model_file.write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(DataError, match="damaged or truncated"):
        load_run(copy)
    missing = dict(state)
    dropped = sorted(missing)[-1]
    del missing[dropped]
    save_file(missing, str(model_file))
    with pytest.raises(DataError, match=f"lacks {dropped}"):
        load_run(copy)
    bent = dict(state)
    bent["projector.0.weight"] = torch.zeros(3, 3)
    save_file(bent, str(model_file))
    with pytest.raises(DataError, match="shape"):
        load_run(copy)
    with pytest.raises(DataError, match=r"no model\.safetensors"):
        model_file.unlink()
        load_run(copy)
    with pytest.raises(DataError, match="does not exist"):
        load_run(tmp_path / "nowhere")


def test_extra_modules_in_the_model_file_are_ignored(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy_run(run_dir, tmp_path)
    state = load_file(run_dir / "model.safetensors")
    save_file(
        {**state, "extras.predictor.0.weight": torch.ones(2, 2)}, str(copy / "model.safetensors")
    )
    _, model = load_run(copy)
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert not any(key.startswith("extras.") for key in loaded)


def test_cli_glue_prints_the_result_and_its_file(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--run", str(run_dir), "--protocol", "knn", "--quiet"])
    assert run_eval(args) == 0
    out = capsys.readouterr().out
    written = json.loads((run_dir / "eval" / "knn.json").read_text())
    assert f"| {100 * written['knn_acc']:.2f} |" in out
    assert str(run_dir / "eval" / "knn.json") in out
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--run", "x", "--protocol", "finetune", "--labels", "0.5"])


def test_result_names() -> None:
    assert result_name("linear", None, None) == "linear.json"
    assert result_name("finetune", 0.01, None) == "finetune-0.01.json"
    assert result_name("finetune", 0.1, "cifar10") == "finetune-0.1-on-cifar10.json"


# ----------------------------------------------------------------------------- issue 17


def test_results_of_different_settings_do_not_overwrite_each_other(
    run_dir: Path, tmp_path: Path
) -> None:
    full = evaluate_run(run_dir, "linear", log=None)
    short = evaluate_run(run_dir, "linear", epochs=2, log=None)
    same = evaluate_run(run_dir, "linear", epochs=5, log=None)  # the run's own probe epochs
    assert (full["file"], short["file"], same["file"]) == (
        "linear.json",
        "linear-2ep.json",
        "linear.json",
    )
    assert json.loads((run_dir / "eval" / "linear-2ep.json").read_text())["linear_epochs"] == 2
    assert json.loads((run_dir / "eval" / "linear.json").read_text())["linear_epochs"] == 5
    first = _write_npz(tmp_path / "first.npz", side=32)
    second = _write_npz(tmp_path / "second.npz", side=32, seed=3)
    for npz in (first, second):
        evaluate_run(run_dir, "knn", eval_data="npz", eval_path=str(npz), log=None)
    assert (run_dir / "eval" / "knn-on-npz-first.json").is_file()
    assert (run_dir / "eval" / "knn-on-npz-second.json").is_file()
    assert result_name("finetune", 0.01, None, epochs=10) == "finetune-0.01-10ep.json"


def test_eval_messages(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--run", str(run_dir), "--protocol", "linear"])
    assert run_eval(args) == 0
    captured = capsys.readouterr()
    # Where the result went is said once, and the probe speaks in % like everything else.
    assert (captured.out + captured.err).count("result written to") == 1
    probe_lines = [line for line in captured.err.splitlines() if "linear probe epoch" in line]
    assert probe_lines and all(line.endswith("%") for line in probe_lines), probe_lines
    lines: list[str] = []
    evaluate_run(run_dir, "finetune", labels=0.1, epochs=10, log=lines.append)
    announced = next(line for line in lines if line.startswith("fine-tuning on"))
    assert "every 50" not in announced and "after the last" in announced
    with pytest.raises(ConfigError, match="--labels"):
        evaluate_run(run_dir, "finetune", log=None)
