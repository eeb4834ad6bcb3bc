"""One Flower round in process, without a SuperLink: the ClientApp trains with the run's
threads, and the strategy rejects, records, counts and prints a poisoned update as the simulator
does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedssd import config as config_module
from fedssd.experiment import build_experiment
from fedssd.federation.callbacks import progress
from fedssd.flower import client_app, records
from fedssd.flower.strategy import MethodStrategy
from fedssd.runs.resolve import load_config

SMOKE = Path(__file__).resolve().parents[2] / "src" / "fedssd" / "configs" / "smoke.toml"
# Another thread count than the process's, so that applying it is visible.
THREADS = 1 if torch.get_num_threads() != 1 else 2
TINY = [
    "data.train_subset=300",
    "data.test_subset=100",
    "model.width=4",
    "model.projector_hidden=32",
    "method.name=fedalignuniform",
    "federation.batch_size=32",
    "evaluation.every=0",
    f"threads={THREADS}",
]


def _poisoned(reply: Message) -> None:
    """Scale every floating-point entry of the reply's weights by 1,000 (an attack)."""
    state = records.from_arrays(reply.content.array_records[records.STATE])
    scaled = {k: v * 1000 if v.is_floating_point() else v for k, v in state.items()}
    reply.content[records.STATE] = records.to_arrays(scaled)


@pytest.mark.slow
def test_a_flower_round_applies_threads_and_says_what_it_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A ServerApp process has its run's identity; messages made outside one need it set.
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = load_config(SMOKE, overrides=TINY)
    experiment = build_experiment(cfg, log=lambda _m: None)
    lines: list[str] = []
    strategy = MethodStrategy(
        global_model=experiment.global_model,
        method=experiment.method,
        schedule=experiment.schedule,
        guards=experiment.guards,
        nodes={client: 100 + client for client in range(4)},
        experiment_text=config_module.dumps(cfg),
        callbacks=[progress(cfg.method.name, cfg.federation.rounds, lines.append)],
        log=lines.append,
    )
    threads: list[int] = []
    original = client_app.client_round

    def counting(*args: Any, **kwargs: Any) -> Any:
        threads.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(client_app, "client_round", counting)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None))  # type: ignore[arg-type]
    replies = []
    for message in messages:
        node = message.metadata.dst_node_id
        context = Context(
            run_id=1,
            node_id=node,
            node_config={"client-id": node - 100},
            state=RecordDict(),
            run_config={},
        )
        replies.append(client_app.train_client(message, context))
    assert threads == [THREADS] * 4 and torch.get_num_threads() != THREADS
    _poisoned(replies[2])
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics is not None
    assert (metrics["accepted"], metrics["failed"], metrics["rejected"]) == (3, 0, 1)
    record = strategy.history[-1]
    assert list(record["rejected"]) == ["2"] and "times the median" in record["rejected"]["2"]
    assert record["failed"] == {}
    assert arrays is not None
    strategy.after_round(1, arrays)
    assert any(
        line.startswith("[fedalignuniform] round 1/2: rejected the update of client 2: update")
        for line in lines
    ), lines
