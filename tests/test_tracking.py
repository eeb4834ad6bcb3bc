"""Experiment tracking (issue 15): what a run writes to TensorBoard, W&B (offline) and MLflow,
read back with each tool's own reader; a failing tracker never stops a run; a missing package
is one sentence before training."""

from __future__ import annotations

import builtins
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import fedssd
import fedssd.experiment
from fedssd import tracking
from fedssd.cli import main
from fedssd.errors import ConfigError

SMOKE = Path(__file__).resolve().parents[1] / "src" / "fedssd" / "configs" / "smoke.toml"
TINY = [
    "data.train_subset=400",
    "data.test_subset=200",
    "federation.rounds=2",
    "evaluation.every=1",
    "evaluation.linear_epochs=3",
    "evaluation.metrics_samples=200",
    "evaluation.metrics_per_client=50",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """W&B never contacts a server here, and keeps its settings inside the test folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def wandb_records(run_file: Path) -> list[Any]:
    """The records of an offline ``.wandb`` file, decoded with W&B's own protobuf schema.

    The file is W&B's transaction log: a 7-byte header, then LevelDB-log framed chunks (32 KiB
    blocks; each chunk a 4-byte checksum, 2-byte length, 1-byte type) that hold one serialised
    ``wandb_internal_pb2.Record`` each.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pieces, records = 32768, 7, [], []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pieces = [chunk]
        elif kind == 3:
            pieces.append(chunk)
        elif kind == 4:
            records.append(b"".join([*pieces, chunk]))
    decoded = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        decoded.append(record)
    return decoded


def _items(items: Any) -> dict[str, Any]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


@pytest.mark.slow
def test_a_run_is_tracked_in_all_three_tools(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = fedssd.train(
        SMOKE,
        overrides=[*TINY, 'tracking.backends="tensorboard,wandb,mlflow"', "tracking.group=g1"],
        out=out,
        log=None,
    )
    history, summary = result.history, result.summary

    # TensorBoard: one scalar per round for the loss parts, kNN, lr and the client counts.
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("loss", "loss_align", "loss_uniform", "knn_acc", "lr", "accepted_clients"):
        assert f"round/{key}" in tags
        values = [e.value for e in events.Scalars(f"round/{key}")]
        assert [e.step for e in events.Scalars(f"round/{key}")] == [1, 2]
        expected = [float(r.get(key, r.get("accepted", 0))) for r in history]
        assert values == pytest.approx(expected, rel=1e-6)
    assert [e.value for e in events.Scalars("round/failed_clients")] == [0.0, 0.0]
    assert events.Scalars("summary/linear_probe_acc")[0].value == pytest.approx(
        summary["linear_probe_acc"], rel=1e-6
    )
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]
    # The hparams plugin's session data (config -> final metrics) is in the same log.
    from tensorboard.plugins.hparams import plugin_data_pb2

    plugin = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["federation.rounds"].number_value == 2
    assert session.session_start_info.hparams["method.name"].string_value == "ssd"

    # W&B: the offline run folder, its history rows and summary.
    run_files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    records = wandb_records(run_files[0])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].run_group == "g1" and runs[0].display_name == "run"
    assert runs[0].project == "fedssd"
    config = _items(runs[0].config.update)
    assert config["federation"]["rounds"] == 2 and config["method"]["name"] == "ssd"
    rows = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [row["_step"] for row in rows] == [1, 2]
    assert [row["loss"] for row in rows] == pytest.approx([r["loss"] for r in history])
    assert [row["knn_acc"] for row in rows] == pytest.approx([r["knn_acc"] for r in history])
    final: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            final.update(_items(r.summary.update))
    assert final["linear_probe_acc"] == pytest.approx(summary["linear_probe_acc"])
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)

    # MLflow: the local file store under the run folder, read with MLflow's client.
    state = json.loads((out / tracking.STATE_FILE).read_text())
    assert state["mlflow"]["uri"] == (out / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=state["mlflow"]["uri"])
    run_id = state["mlflow"]["run_id"]
    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in loss] == [1, 2]
    assert [m.value for m in loss] == pytest.approx([r["loss"] for r in history])
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED"
    assert info.data.params["federation.rounds"] == "2"
    assert info.data.tags["group"] == "g1"
    assert info.data.metrics["summary.knn_acc"] == pytest.approx(summary["knn_acc"])


class Exploding:
    """A tracker whose writes fail, as on a full disk or a server that went away."""

    name = "exploding"

    def __init__(self) -> None:
        self.calls = 0

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        raise ConnectionError("server gone")


def test_a_failing_tracker_warns_once_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exploding = Exploding()
    lines: list[str] = []

    def make(config: Any, out_dir: Any, *, say: Any, **_kwargs: Any) -> list[Any]:
        return [tracking.GuardedTracker(exploding, say)]

    monkeypatch.setattr(fedssd.experiment, "make_trackers", make)
    result = fedssd.train(SMOKE, overrides=TINY, out=tmp_path / "run", log=lines.append)
    assert (tmp_path / "run" / "summary.json").is_file() and len(result.history) == 2
    warnings = [line for line in lines if "exploding tracking failed" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert "the run goes on" in warnings[0]
    assert exploding.calls == 1  # switched off after the first failure


@pytest.mark.slow
def test_the_same_run_with_and_without_tracking_computes_the_same(tmp_path: Path) -> None:
    plain = fedssd.train(SMOKE, overrides=TINY, out=None, log=None)
    tracked = fedssd.train(
        SMOKE, overrides=[*TINY, "tracking.backends=tensorboard"], out=tmp_path / "r", log=None
    )
    assert plain.history[-1]["loss"] == tracked.history[-1]["loss"]
    assert plain.summary["knn_acc"] == tracked.summary["knn_acc"]


def test_a_missing_package_is_one_sentence_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_import = builtins.__import__

    def no_mlflow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    monkeypatch.setattr("importlib.import_module", lambda name: no_mlflow(name))
    out = tmp_path / "run"
    code = main(["train", "--config", str(SMOKE), "--out", str(out), "--track", "mlflow"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pip install 'fedssd[mlflow]'" in err and err.count("\n") == 1
    assert not out.exists()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match="choose from tensorboard, wandb, mlflow"):
        fedssd.load_config(SMOKE, overrides=["tracking.backends=tensorbored"])


def test_round_scalars_count_clients() -> None:
    record = {
        "round": 3,
        "clients": [0, 1, 2],
        "lr": 0.1,
        "loss": 1.5,
        "accepted": 1,
        "failed": {"2": "crashed"},
        "rejected": {"1": "update moved ..."},
        "skipped": False,
        "client_state": {"0": {"lambda": 0.5}},
    }
    assert tracking.round_scalars(record) == {
        "lr": 0.1,
        "loss": 1.5,
        "accepted_clients": 1.0,
        "sampled_clients": 3.0,
        "failed_clients": 1.0,
        "rejected_clients": 1.0,
        "skipped": 0.0,
    }


def test_wandb_mode_never_goes_online_without_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking.wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert tracking.wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode("online") == "offline"


@pytest.mark.slow
def test_resume_continues_the_same_mlflow_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    overrides = [*TINY, "tracking.backends=mlflow", "checkpoint.every=1"]
    fedssd.train(SMOKE, overrides=overrides, out=out, log=None)
    first = json.loads((out / tracking.STATE_FILE).read_text())["mlflow"]
    (out / "summary.json").unlink()  # as if killed during the final evaluation
    fedssd.resume(out, log=None)
    again = json.loads((out / tracking.STATE_FILE).read_text())["mlflow"]
    assert again == first
    client = MlflowClient(tracking_uri=first["uri"])
    experiment = client.get_experiment_by_name("fedssd")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert client.get_run(first["run_id"]).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first["run_id"], "loss")] == [1, 2]
