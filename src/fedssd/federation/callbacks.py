"""The round callbacks of a run: checkpoints, the metrics file, the progress lines and the kNN
monitor, called after each round by the simulator and the Flower strategy
(:func:`fedssd.federation.server.run_callbacks`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedssd import config as config_module
from fedssd.config import Config
from fedssd.data.federated import EvaluationViews
from fedssd.federation.client import LocalResult
from fedssd.federation.evaluate import knn_monitor
from fedssd.federation.privacy import release_view, withheld
from fedssd.federation.sampling import clients_per_round
from fedssd.federation.server import Callback
from fedssd.federation.simulator import ClientCallback
from fedssd.methods.protocol import Method
from fedssd.methods.server import server_state
from fedssd.runs.checkpoint import Checkpoint, run_identity, save_checkpoint
from fedssd.runs.outputs import (
    SERVER_ONLY_LOG,
    append_jsonl,
    jsonable,
    write_text_atomic,
)
from fedssd.runs.store import ClientStore

Log = Callable[[str], None]


def checkpointer(
    config: Config,
    out_dir: Path,
    method: Method,
    store: ClientStore,
    history: list[dict[str, Any]],
    *,
    started: float,
) -> Callback:
    """A round callback writing a checkpoint every ``checkpoint.every`` rounds and at the end;
    ``started`` is the ``time.perf_counter()`` the run's training time counts from."""
    identity = run_identity(config_module.to_dict(config))
    every, rounds = config.checkpoint.every, config.federation.rounds

    def save(record: dict[str, Any], model: nn.Module) -> None:
        done = int(record["round"])
        if done % every and done != rounds:
            return
        checkpoint = Checkpoint(
            rounds_done=done,
            model={k: v.detach() for k, v in model.state_dict().items()},
            server=server_state(method),
            store=store,
            history=history[:done],
            identity=identity,
            train_seconds=time.perf_counter() - started,
        )
        save_checkpoint(out_dir, checkpoint, keep=config.checkpoint.keep)

    return save


def round_callbacks(
    config: Config,
    views: EvaluationViews | None,
    device: torch.device,
    out_dir: Path | None,
    say: Log,
) -> list[Callback]:
    """The round callbacks: the kNN monitor, the metrics file and the progress line.

    Without ``views`` (a federated evaluation: no labelled set in one place) the kNN monitor is
    off, which is said once; so is a norm check that no round can run (too few clients sampled).
    """
    callbacks: list[Callback] = []
    checks, fed = config.validation, config.federation
    sampled = clients_per_round(num_clients=fed.num_clients, fraction=fed.fraction)
    if checks.max_norm_ratio > 0 and sampled <= checks.min_peers:
        say(
            f"the update norm check is off: it judges an update against at least "
            f"{checks.min_peers} others (validation.min_peers) and a round samples {sampled} "
            "clients"
        )
    ev = config.evaluation
    if ev.every and views is None:
        say(
            "the kNN monitor is off: it needs a labelled set on the server (evaluation.data); "
            "the final evaluation is federated"
        )
    elif ev.every and views is not None:
        callbacks.append(
            knn_monitor(
                every=ev.every,
                last_round=config.federation.rounds,
                bank_images=views.train_images,
                bank_labels=views.train_labels,
                test_images=views.test_images,
                test_labels=views.test_labels,
                num_classes=views.num_classes,
                k=ev.knn_k,
                temperature=ev.knn_temperature,
                batch_size=ev.batch_size,
                device=device,
            )
        )
    if out_dir is not None:
        callbacks.append(round_logger(config, out_dir))
    callbacks.append(
        progress(
            config.method.name,
            config.federation.rounds,
            say,
            name_clients=config.privacy.dp == "off",
        )
    )
    return callbacks


def round_logger(config: Config, out_dir: Path) -> Callback:
    """A callback appending each round's record to ``metrics.jsonl``; in a DP run only its
    published part there and the rest to the server-only log (:data:`SERVER_ONLY_LOG`)."""
    view = release_view(config)
    private = config.privacy.dp != "off"
    if private:
        (out_dir / SERVER_ONLY_LOG).parent.mkdir(exist_ok=True)

    def write(record: dict[str, Any], _model: nn.Module) -> None:
        append_jsonl(out_dir / "metrics.jsonl", view(record))
        if private:
            append_jsonl(out_dir / SERVER_ONLY_LOG, withheld(record))

    return write


def rewrite_round_logs(config: Config, out_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` (and a DP run's server-only log) to hold ``history`` alone, as
    :func:`round_logger` wrote it (a resumed run redoes the rounds after its checkpoint)."""
    view = release_view(config)

    def lines(records: list[dict[str, Any]]) -> str:
        return "".join(json.dumps(jsonable(record)) + "\n" for record in records)

    write_text_atomic(out_dir / "metrics.jsonl", lines([view(r) for r in history]))
    if config.privacy.dp != "off":
        (out_dir / SERVER_ONLY_LOG).parent.mkdir(exist_ok=True)
        write_text_atomic(out_dir / SERVER_ONLY_LOG, lines([withheld(r) for r in history]))


def client_progress(name: str, rounds: int, say: Log) -> ClientCallback:
    """A per-client progress line, for rounds too long to wait for in silence."""

    def report(round_index: int, position: int, count: int, result: LocalResult) -> None:
        say(
            f"[{name}] round {round_index + 1}/{rounds} client {position + 1}/{count} "
            f"(id {result.client_id}): {result.num_batches} batches, loss {result.loss:.4f}, "
            f"{result.seconds:.1f}s"
        )

    return report


def progress(name: str, rounds: int, say: Log, *, name_clients: bool = True) -> Callback:
    """A callback printing one line per round with the loss parts and the time left (from the
    rounds this process ran: a resumed run's earlier rounds took no time here), then one line
    per client whose update was refused or that failed, naming it and the reason; without
    ``name_clients`` (a DP run, whose cohort stays on the server) one line counting them."""
    started = time.perf_counter()
    before: list[int] = []  # rounds done before the first this process reports

    def report(record: dict[str, Any], _model: nn.Module) -> None:
        done = record["round"]
        if not before:
            before.append(done - 1)
        elapsed = time.perf_counter() - started
        eta = elapsed / (done - before[0]) * (rounds - done)
        parts = " ".join(
            f"{key[5:]} {value:.4f}" for key, value in record.items() if key.startswith("loss_")
        )
        knn = f" | knn {100 * record['knn_acc']:.2f}%" if "knn_acc" in record else ""
        say(
            f"[{name}] round {done}/{rounds} | loss {record['loss']:.4f} ({parts}){knn} "
            f"| {record['seconds']:.1f}s | eta {eta:.0f}s"
        )
        rejected, failed = record.get("rejected", {}), record.get("failed", {})
        if not name_clients:
            if rejected or failed:
                say(
                    f"[{name}] round {done}/{rounds}: {len(rejected)} update(s) rejected, "
                    f"{len(failed)} client(s) failed (named in {SERVER_ONLY_LOG})"
                )
            return
        for client, reason in rejected.items():
            say(f"[{name}] round {done}/{rounds}: rejected the update of client {client}: {reason}")
        for client, reason in failed.items():
            say(f"[{name}] round {done}/{rounds}: client {client} failed: {reason}")

    return report
