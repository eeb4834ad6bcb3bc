"""Issue 3: checkpoints and resume, simulated faults, update validation, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fedssd
from fedssd.aggregate import fedavg
from fedssd.cli import main
from fedssd.config import FaultConfig, ValidationConfig
from fedssd.data.augment import SSL_AUGMENT
from fedssd.errors import ConfigError, DataError, TrainingDiverged
from fedssd.federation.client import LocalSettings
from fedssd.federation.faults import draw_fault
from fedssd.federation.simulator import Guards, Schedule, run_rounds
from fedssd.federation.validate import check_update, learned_keys, norm_outliers, update_distance
from fedssd.methods import ClientUpdate, MethodContext, build_method
from fedssd.methods.protocol import ClientState
from fedssd.models import build_model
from fedssd.runs.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from fedssd.runs.store import ClientStore
from helpers import method_context

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "src" / "fedssd" / "configs" / "smoke.toml")
# A run of a few seconds with a checkpoint after every round and a kNN record every round.
TINY = [
    "data.train_subset=600",
    "data.test_subset=200",
    "model.width=4",
    "model.projector_hidden=32",
    "federation.rounds=5",
    "federation.batch_size=32",
    "evaluation.linear_epochs=5",
    "evaluation.metrics_samples=200",
    "evaluation.metrics_per_client=50",
    "checkpoint.every=1",
    "checkpoint.keep=2",
]
TIMING = {"seconds", "train_seconds", "wall_seconds"}


def _sets(overrides: Sequence[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def _records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _same_weights(a: Path, b: Path) -> None:
    first, second = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "stops"),
    [
        ([], (1, 3)),
        # A stateful method in a cross-device run: the client store must survive the restart.
        (["method.name=fedema", "federation.num_clients=4", "federation.fraction=0.5"], (2,)),
    ],
)
def test_interrupted_and_resumed_run_is_bit_identical(
    tmp_path: Path, extra: list[str], stops: tuple[int, ...]
) -> None:
    """Stop a run after a round (an exception from a callback, in process) and resume it:
    weights and metrics equal the uninterrupted run's."""
    import fedssd.experiment as session

    overrides = [*TINY, *extra]
    whole = fedssd.train(SMOKE, overrides=overrides, out=tmp_path / "whole", log=None)
    for stop_after in stops:
        run = tmp_path / f"stop{stop_after}"

        class Stop(Exception):
            pass

        def bomb(record: dict[str, Any], _model: nn.Module, at: int = stop_after) -> None:
            if record["round"] == at + 1:
                raise Stop

        original = session.round_callbacks

        def patched(*args: Any, original: Any = original, **kwargs: Any) -> list[Any]:
            return [*original(*args, **kwargs), bomb]

        session.round_callbacks = patched  # type: ignore[assignment]
        try:
            with pytest.raises(Stop):
                fedssd.train(SMOKE, overrides=overrides, out=run, log=None)
        finally:
            session.round_callbacks = original  # type: ignore[assignment]
        # The callback ran after the metrics line of round stop_after + 1 but before its checkpoint.
        assert [p.name for p in list_checkpoints(run)][-1] == f"round-{stop_after:06d}"
        assert not (run / "summary.json").exists()
        resumed = fedssd.resume(run, log=None)
        _same_weights(whole.out_dir, run)  # type: ignore[arg-type]
        assert _records(run) == _records(whole.out_dir)  # type: ignore[arg-type]
        for key, value in whole.summary.items():
            if key not in TIMING:
                assert resumed.summary[key] == value, key
        assert len(list_checkpoints(run)) == 2  # rotation keeps checkpoint.keep


@pytest.mark.slow
def test_a_resumed_runs_times_count_every_stretch(tmp_path: Path) -> None:
    """Each checkpoint keeps the training time so far; a resumed run's ``train_seconds`` and
    ``wall_seconds`` add the stretch before it (here a checkpoint that says 1,000 s)."""
    run = tmp_path / "run"
    overrides = [*TINY, "federation.rounds=1", "evaluation.linear_epochs=0"]
    fedssd.train(SMOKE, overrides=overrides, out=run, log=None)
    state = list_checkpoints(run)[-1] / "state.json"
    meta = json.loads(state.read_text())
    assert 0 < meta["train_seconds"] < 1000
    meta["train_seconds"] = 1000.0  # digests cover the tensor files only
    state.write_text(json.dumps(meta))
    started = time.perf_counter()
    summary = fedssd.resume(run, rounds=2, log=None).summary
    this_stretch = time.perf_counter() - started
    assert 1000 < summary["train_seconds"] <= summary["wall_seconds"] < 1000 + this_stretch
    assert (
        1000
        < json.loads((list_checkpoints(run)[-1] / "state.json").read_text())["train_seconds"]
        < 1000 + this_stretch
    )


# The CLI with a signal sent to itself at a fixed point of the run, so that no test races the
# process: at the os.replace that moves checkpoint folder argv[1] into place, SIGKILL comes just
# before it (the checkpoint's files are written but the write is cut short), any other signal
# just after (a run stopped between rounds).
SIGNAL_AT_CHECKPOINT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from fedssd.cli import main

    folder, signum = sys.argv[1], int(sys.argv[2])
    # Ctrl-C in a terminal reaches a process that handles SIGINT; a shell starts its background
    # jobs (nohup, `make test &`) with SIGINT ignored, which this process would inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    replace = os.replace

    def replace_and_signal(src, dst, *args, **kwargs):
        target = Path(dst)
        if target.name == folder and target.parent.name == "checkpoints":
            if signum == 9:
                os.kill(os.getpid(), signum)
            replace(src, dst, *args, **kwargs)
            os.kill(os.getpid(), signum)
            return
        replace(src, dst, *args, **kwargs)

    os.replace = replace_and_signal
    sys.exit(main(sys.argv[3:]))
    """
)
SIGNALLED = [*TINY, "federation.rounds=4"]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 4-round CLI run that the signalled runs are resumed to."""
    whole = tmp_path_factory.mktemp("signals") / "whole"
    command = [sys.executable, "-m", "fedssd.cli", "train", "--config", SMOKE, "--quiet"]
    command += [*_sets(SIGNALLED), "--out", str(whole)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, env=env, check=True, capture_output=True)
    return whole


def _signalled_run(out: Path, folder: str, signum: int) -> subprocess.CompletedProcess[str]:
    """The 4-round CLI run into ``out`` with ``signum`` sent at checkpoint ``folder``."""
    command = ["train", "--config", SMOKE, "--quiet", *_sets(SIGNALLED), "--out", str(out)]
    return subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_CHECKPOINT, folder, str(signum), *command],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_sigkill_in_a_checkpoint_write_then_resume_is_bit_identical(
    tmp_path: Path, whole_run: Path
) -> None:
    """The real thing: a separate process killed with SIGKILL while it writes the checkpoint of
    round 3 (its files written, the folder not yet in place), resumed from the CLI."""
    killed = tmp_path / "killed"
    done = _signalled_run(killed, "round-000003", signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert [c.name for c in list_checkpoints(killed)] == ["round-000001", "round-000002"]
    assert list((killed / "checkpoints").glob(".tmp-round-000003-*")), "no write was cut short"
    assert not (killed / "summary.json").exists()
    result = subprocess.run(
        [sys.executable, "-m", "fedssd.cli", "train", "--resume", str(killed), "--quiet"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    _same_weights(whole_run, killed)
    assert _records(killed) == _records(whole_run)


def test_resume_refuses_bad_folders_and_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    overrides = [*TINY, "federation.rounds=2"]
    fedssd.train(SMOKE, overrides=overrides, out=run, log=None)

    def resume_error(path: Path) -> str:
        assert main(["train", "--resume", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
        return err

    assert "has finished" in resume_error(run)
    assert "not a fedssd run folder" in resume_error(tmp_path / "nothing")
    (run / "summary.json").unlink()
    files = [c / "model.safetensors" for c in list_checkpoints(run)]
    originals = [f.read_bytes() for f in files]

    for file, data in zip(files, originals, strict=True):
        file.write_bytes(data[: len(data) // 2])  # truncated
    assert "corrupted or truncated" in resume_error(run)
    for file, data in zip(files, originals, strict=True):
        flipped = bytearray(data)
        flipped[-5] ^= 0xFF
        file.write_bytes(bytes(flipped))  # one flipped byte
    assert "corrupted or truncated" in resume_error(run)
    for file, data in zip(files, originals, strict=True):
        file.write_bytes(data)

    config = (run / "config.toml").read_text()
    (run / "config.toml").write_text(config.replace("seed = 17", "seed = 18"))
    assert "different configuration" in resume_error(run)
    (run / "config.toml").write_text(config)

    for checkpoint in list_checkpoints(run):
        (checkpoint / "state.json").write_text("{not json")
    assert "corrupted" in resume_error(run)
    for checkpoint in list_checkpoints(run):
        for file in checkpoint.iterdir():
            file.unlink()
        checkpoint.rmdir()
    assert "no checkpoint" in resume_error(run)
    assert main(["train", "--resume", str(run), "--config", SMOKE]) == 2
    assert "drop --config" in capsys.readouterr().err


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = fedssd.train(
        SMOKE, overrides=[*TINY, "federation.rounds=3"], out=tmp_path / "w", log=None
    )
    run = tmp_path / "run"
    fedssd.train(SMOKE, overrides=[*TINY, "federation.rounds=3"], out=run, log=None)
    (run / "summary.json").unlink()
    newest = list_checkpoints(run)[-1]
    (newest / "clients.safetensors").write_bytes(b"")  # as after a power cut
    (run / "checkpoints" / ".tmp-round-000004-1").mkdir()  # left by a killed write
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint file {newest}/clients.safetensors is corrupted" in err
    assert "resuming" in err and "after round 2 of 3" in err
    assert not list((run / "checkpoints").glob(".tmp-*"))
    _same_weights(whole.out_dir, run)  # type: ignore[arg-type]


@pytest.mark.slow
def test_overwrite_removes_the_earlier_runs_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fedssd.train(SMOKE, overrides=[*TINY, "federation.rounds=4"], out=run, log=None)
    fedssd.train(SMOKE, overrides=[*TINY, "federation.rounds=2"], out=run, overwrite=True, log=None)
    assert [p.name for p in list_checkpoints(run)] == ["round-000001", "round-000002"]


def test_checkpoint_write_is_atomic_and_rotated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ClientStore()
    store.put(
        3,
        ClientState(
            tensors={"t": torch.arange(4.0)}, scalars={"lam": 0.5}, last_round=1, participations=2
        ),
    )

    def checkpoint(done: int) -> Checkpoint:
        return Checkpoint(
            rounds_done=done,
            model={"w": torch.full((2,), float(done))},
            server={},
            store=store,
            history=[{"round": r + 1, "loss": float("nan")} for r in range(done)],
            identity={"seed": 1},
        )

    for done in (1, 2, 3):
        save_checkpoint(tmp_path, checkpoint(done), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000002", "round-000003"]
    loaded = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert loaded.rounds_done == 3 and torch.equal(loaded.model["w"], torch.full((2,), 3.0))
    restored = loaded.store.get(3)
    assert restored is not None and restored.scalars == {"lam": 0.5}
    assert restored.participations == 2 and torch.equal(restored.tensors["t"], torch.arange(4.0))

    import fedssd.runs.checkpoint as module

    calls = {"n": 0}
    real = module.save_model

    def failing(path: Path, state: Mapping[str, torch.Tensor]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real(path, state)

    monkeypatch.setattr(module, "save_model", failing)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, checkpoint(4), keep=2)
    # The crash mid-write left the newest complete checkpoint in place and readable.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000002", "round-000003"]
    assert load_checkpoint(list_checkpoints(tmp_path)[-1]).rounds_done == 3


# ----------------------------------------------------------------------------- the round loop


def _images() -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8)
    return images, [torch.arange(16 * k, 16 * (k + 1)) for k in range(6)]


def _model() -> nn.Module:
    torch.manual_seed(1)
    return build_model(encoder="small_cnn", width=2, projector_hidden=8, projector_out=None)


def _context(num_clients: int = 6) -> MethodContext:
    return method_context(num_clients, feature_dim=8, embed_dim=8, seed=3)


def _run(
    method: Any,
    *,
    guards: Guards | None = None,
    rounds: int = 2,
    fraction: float = 1.0,
    store: ClientStore | None = None,
    data: tuple[torch.Tensor, list[torch.Tensor]] | None = None,
) -> tuple[list[dict[str, Any]], nn.Module, nn.Module]:
    images, indices = _images() if data is None else data
    start, global_model = _model(), _model()
    history = run_rounds(
        global_model=global_model,
        client_model=_model(),
        method=method,
        images=images,
        client_indices=indices,
        schedule=Schedule(
            num_clients=6, fraction=fraction, rounds=rounds, lr=0.05, lr_schedule="constant", seed=5
        ),
        settings=LocalSettings(
            epochs=1, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.0, augment=SSL_AUGMENT
        ),
        store=store,
        guards=guards,
    )
    return history, start, global_model


def test_fault_draws_follow_their_probabilities_and_the_seed() -> None:
    settings = FaultConfig(crash=0.1, straggle=0.2, drop=0.3)
    draws = [
        draw_fault(settings, seed=9, round_index=r, client_id=c)
        for r in range(100)
        for c in range(50)
    ]
    n = len(draws)
    assert abs(draws.count("crash") / n - 0.1) < 0.02
    assert abs(draws.count("straggle") / n - 0.2) < 0.02
    assert abs(draws.count("drop") / n - 0.3) < 0.02
    again = [
        draw_fault(settings, seed=9, round_index=r, client_id=c)
        for r in range(100)
        for c in range(50)
    ]
    assert draws == again
    assert draw_fault(FaultConfig(), seed=9, round_index=0, client_id=0) is None


@pytest.mark.parametrize(
    ("faults", "reason"),
    [
        (FaultConfig(crash=1.0), "crashed"),
        (FaultConfig(straggle=1.0), "missed the deadline"),
        (FaultConfig(drop=1.0), "update lost"),
    ],
)
def test_a_round_without_survivors_is_skipped_not_fatal(faults: FaultConfig, reason: str) -> None:
    history, start, final = _run(
        build_method("fedalignuniform", {}, _context()), guards=Guards(faults=faults)
    )
    assert all(record["skipped"] and record["accepted"] == 0 for record in history)
    assert all(set(record["failed"].values()) == {reason} for record in history)
    for key, value in start.state_dict().items():
        assert torch.equal(final.state_dict()[key], value)


def test_survivors_are_aggregated_and_failures_recorded() -> None:
    faults = FaultConfig(crash=0.3, straggle=0.2)
    recorder = Recorder(build_method("fedalignuniform", {}, _context()))
    history, _, _ = _run(recorder, guards=Guards(faults=faults), rounds=3)
    for record, updates in zip(history, recorder.rounds, strict=True):
        failed = {int(k) for k in record["failed"]}
        assert {u.client_id for u in updates} == set(record["clients"]) - failed
        expected = {
            c
            for c in record["clients"]
            if draw_fault(faults, seed=5, round_index=record["round"] - 1, client_id=c)
        }
        assert failed == expected
    assert any(record["failed"] for record in history)
    strict = FaultConfig(crash=0.3, straggle=0.2, min_clients=6)
    history, _, _ = _run(
        build_method("fedalignuniform", {}, _context()), guards=Guards(faults=strict), rounds=3
    )
    assert all(record["skipped"] == bool(record["failed"]) for record in history)


class Recorder:
    """Delegates to a method and records each round's accepted updates."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.rounds: list[list[ClientUpdate]] = []

    def local_loss(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.inner.local_loss(*args, **kwargs)  # type: ignore[no-any-return]

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
    ) -> dict[str, torch.Tensor]:
        self.rounds.append(list(updates))
        from fedssd.methods.server import aggregate_updates

        return aggregate_updates(self.inner, global_state, updates, round_index=round_index)


class Saboteur(Recorder):
    """Client ``victim`` sends a corrupted model (via the end-of-client hook); the others train
    normally. Also counts participations in the client store."""

    local_modules: frozenset[str] = frozenset()

    def __init__(
        self, inner: Any, *, victim: int, corrupt: str, nan_loss_for: Sequence[int] = ()
    ) -> None:
        super().__init__(inner)
        self.victim, self.corrupt, self.nan_loss_for = victim, corrupt, set(nan_loss_for)

    def local_loss(
        self,
        model: nn.Module,
        view1: torch.Tensor,
        view2: torch.Tensor,
        *,
        client_id: int,
        position: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts = self.inner.local_loss(
            model, view1, view2, client_id=client_id, position=position
        )
        if client_id in self.nan_loss_for:
            loss = loss * float("nan")
        return loss, parts

    def begin_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass

    def end_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> tuple[ClientState, dict[str, torch.Tensor]]:
        if client_id == self.victim:
            with torch.no_grad():
                first = next(model.parameters())
                if self.corrupt == "nan":
                    first[0] = float("nan")
                elif self.corrupt == "scale":
                    for p in model.parameters():
                        p.mul_(1000.0)
        return ClientState(scalars={"seen": 1.0}), {}


@pytest.mark.parametrize(
    ("corrupt", "reason"), [("nan", "NaN or infinite"), ("scale", "times the median")]
)
def test_poisoned_updates_are_rejected_and_the_round_goes_on(corrupt: str, reason: str) -> None:
    method = Saboteur(build_method("fedalignuniform", {}, _context()), victim=2, corrupt=corrupt)
    store = ClientStore()
    history, _, final = _run(method, rounds=1, store=store)
    record = history[0]
    assert list(record["rejected"]) == ["2"] and reason in record["rejected"]["2"]
    assert record["failed"] == {}
    assert not record["skipped"] and record["accepted"] == 5
    updates = method.rounds[0]
    assert 2 not in {u.client_id for u in updates}
    expected = fedavg([u.state for u in updates], [u.weight for u in updates])
    for key, value in expected.items():
        assert torch.equal(final.state_dict()[key], value)
    assert {c: store.get(c).participations for c in store} == dict.fromkeys(range(6), 1)  # type: ignore[union-attr]


def test_a_nan_local_loss_drops_that_client_and_all_nan_stops_the_run() -> None:
    method = Saboteur(
        build_method("fedalignuniform", {}, _context()), victim=-1, corrupt="", nan_loss_for=[4]
    )
    history, _, _ = _run(method, rounds=1)
    assert history[0]["failed"] == {"4": "local loss is NaN or infinite"}
    assert history[0]["accepted"] == 5
    everyone = Saboteur(
        build_method("fedalignuniform", {}, _context()),
        victim=-1,
        corrupt="",
        nan_loss_for=range(6),
    )
    with pytest.raises(TrainingDiverged, match="diverged in round 1"):
        _run(everyone, rounds=1)


def test_divergence_through_the_cli_exits_1_and_keeps_the_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            SMOKE,
            "--quiet",
            "--out",
            str(run),
            *_sets([*TINY, "federation.lr=1e30"]),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "diverged" in err and err.count("\n") == 0
    assert not (run / "summary.json").exists()
    assert (run / "config.toml").exists()


def test_update_checks() -> None:
    expected = {"w": torch.zeros(2, 3), "n": torch.tensor(3)}
    assert check_update(expected, {"w": torch.ones(2, 3), "n": torch.tensor(5)}) is None
    assert "missing" in str(check_update(expected, {"w": torch.ones(2, 3)}))
    assert "unexpected" in str(check_update(expected, {**expected, "x": torch.ones(1)}))
    assert "shape" in str(check_update(expected, {"w": torch.ones(3, 2), "n": torch.tensor(3)}))
    assert "dtype" in str(
        check_update(expected, {"w": torch.ones(2, 3, dtype=torch.float64), "n": torch.tensor(3)})
    )
    assert "infinite" in str(
        check_update(expected, {"w": torch.full((2, 3), float("inf")), "n": torch.tensor(3)})
    )
    assert update_distance(
        {"w": torch.zeros(2), "s": torch.zeros(1)},
        {"w": torch.tensor([3.0, 4.0]), "s": torch.tensor([100.0])},
        keys={"w"},
    ) == pytest.approx(5.0)
    assert norm_outliers([1.0, 1.1, 0.9, 50.0], ratio=10, min_peers=2) == [3]
    assert norm_outliers([1.0, 1.1, 0.9, 50.0, 60.0], ratio=10, min_peers=2) == [3, 4]
    assert norm_outliers([1.0, 50.0], ratio=10, min_peers=2) == []  # too few peers to judge
    assert norm_outliers([1.0, 1.1, 0.9, 50.0], ratio=0, min_peers=2) == []  # switched off


def test_a_large_honest_client_is_not_mistaken_for_an_outlier() -> None:
    """Client 0 holds 20 times the data of the others (as under a Dirichlet split): in total its
    learned weights move more than 5 times the median, per local step they do not, and it is
    kept by a check at ratio 5."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (240, 3, 8, 8), dtype=torch.uint8)
    indices = [torch.arange(0, 160), *(torch.arange(160 + 16 * k, 176 + 16 * k) for k in range(5))]
    recorder = Recorder(build_method("fedalignuniform", {}, _context()))
    guards = Guards(validation=ValidationConfig(max_norm_ratio=5))
    history, start, _ = _run(recorder, rounds=1, data=(images, indices), guards=guards)
    assert history[0]["failed"] == {} and history[0]["rejected"] == {}
    assert history[0]["accepted"] == 6
    updates = recorder.rounds[0]
    keys = learned_keys(start)
    totals = [update_distance(start.state_dict(), u.state, keys=keys) for u in updates]
    others = sorted(totals[1:])
    assert totals[0] > 5 * others[len(others) // 2]  # the total-distance rule would reject it


def test_validation_settings_are_used() -> None:
    method = Saboteur(build_method("fedalignuniform", {}, _context()), victim=2, corrupt="scale")
    history, _, _ = _run(
        method, rounds=1, guards=Guards(validation=ValidationConfig(max_norm_ratio=0))
    )
    assert history[0]["rejected"] == {} and history[0]["accepted"] == 6


def test_checkpoint_does_not_unpickle(tmp_path: Path) -> None:
    """A pickle planted as a checkpoint file is refused as corrupted, never loaded."""
    store = ClientStore()
    save_checkpoint(tmp_path, Checkpoint(1, {"w": torch.zeros(1)}, {}, store, [], {}), keep=1)
    folder = list_checkpoints(tmp_path)[-1]
    torch.save({"w": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(DataError, match="corrupted"):
        load_checkpoint(folder)


# ----------------------------------------------------------------------------- issue 17


@pytest.mark.slow
def test_sigterm_and_ctrl_c_say_how_to_resume_and_the_resumed_run_is_bit_identical(
    tmp_path: Path, whole_run: Path
) -> None:
    """A cluster's preemption (SIGTERM) and Ctrl-C (SIGINT) right after the checkpoint of round
    2: exit 143 / 130 with the resume command and its checkpoint; resuming finishes the run
    exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        stopped = tmp_path / signum.name
        done = _signalled_run(stopped, "round-000002", signum)
        err = done.stderr
        assert done.returncode == code, err
        assert not (stopped / "summary.json").exists(), "the run finished before the signal"
        assert "Traceback" not in err
        newest = list_checkpoints(stopped)[-1].name
        assert newest == "round-000002"
        assert f"stopped by {signum.name}" in err
        assert f"fedssd train --resume {stopped} (from checkpoint {newest}" in err, err
        result = subprocess.run(
            [sys.executable, "-m", "fedssd.cli", "train", "--resume", str(stopped), "--quiet"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        _same_weights(whole_run, stopped)
        assert _records(stopped) == _records(whole_run)


@pytest.mark.slow
def test_a_finished_run_extended_with_rounds_equals_the_longer_run(tmp_path: Path) -> None:
    overrides = [*TINY, "federation.rounds=2", "evaluation.every=2", "checkpoint.every=2"]
    longer = fedssd.train(
        SMOKE, overrides=[*overrides, "federation.rounds=5"], out=tmp_path / "five", log=None
    )
    short = tmp_path / "short"
    # Three rounds: its last one is measured by the kNN monitor, which the longer run skips.
    fedssd.train(SMOKE, overrides=[*overrides, "federation.rounds=3"], out=short, log=None)
    before = json.loads((short / "summary.json").read_text())
    code = main(["train", "--resume", str(short), "--quiet", "--rounds", "5"])
    assert code == 0
    _same_weights(longer.out_dir, short)  # type: ignore[arg-type]
    assert _records(short) == _records(longer.out_dir)  # type: ignore[arg-type]
    assert fedssd.load_config(short / "config.toml").federation.rounds == 5
    # The 3-round run's outputs are kept aside, not lost.
    assert json.loads((short / "rounds-3" / "summary.json").read_text()) == before
    assert (short / "rounds-3" / "model.safetensors").is_file()
    assert json.loads((short / "summary.json").read_text())["rounds"] == 5
    # Finished again: plain --resume refuses and says how to extend.
    with pytest.raises(ConfigError, match="--rounds N"):
        fedssd.resume(short, log=None)


@pytest.mark.slow
def test_extension_is_refused_where_it_cannot_be_exact(tmp_path: Path) -> None:
    run = tmp_path / "cosine"
    fedssd.train(
        SMOKE,
        overrides=[*TINY, "federation.rounds=2", "federation.lr_schedule=cosine"],
        out=run,
        log=None,
    )
    with pytest.raises(ConfigError, match="cosine"):
        fedssd.resume(run, rounds=4, log=None)
    assert fedssd.load_config(run / "config.toml").federation.rounds == 2
    assert (run / "summary.json").is_file()
    with pytest.raises(ConfigError, match="greater than 2"):
        fedssd.resume(run, rounds=2, log=None)
