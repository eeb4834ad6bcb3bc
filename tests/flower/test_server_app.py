"""What the ServerApp says: a user's mistake in one sentence, a site gone offline by name, a
resumed run's rounds in fedssd's numbering beside Flower's (without Flower processes)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.supercore.task_identity import TaskIdentity
from test_simulation import experiment

from fedssd.errors import ConfigError
from fedssd.experiment import build_experiment
from fedssd.flower import server_app
from fedssd.flower.strategy import OFFLINE, MethodStrategy
from fedssd.runs.resolve import load_config

__all__ = ["experiment"]  # a fixture used by name


def _flower_log(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


def test_a_mistake_is_one_sentence_and_fails_the_run(caplog: pytest.LogCaptureFixture) -> None:
    context = Context(
        run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={"resume": True}
    )
    grid = SimpleNamespace(run=SimpleNamespace(fab_id="", fab_version="", fab_hash=""))
    flower = logging.getLogger("flwr")
    with caplog.at_level(logging.INFO, logger="flwr"):
        # Raised again, so that Flower marks the run failed with the sentence as its details.
        with pytest.raises(ConfigError, match="resume needs the run's folder") as raised:
            server_app.main(grid, context)  # type: ignore[arg-type]
        # What Flower then logs of the exception carries no traceback.
        flower.error("ServerApp raised an exception", exc_info=raised.value)
        try:
            raise ValueError("keeps its traceback")
        except ValueError as bug:
            flower.error("a bug", exc_info=bug)
    log = _flower_log(caplog)
    assert "ERROR fedssd run 7 failed: resume needs the run's folder" in log
    assert log.count("Traceback") == 1 and "ValueError: keeps its traceback" in log


class _Grid:
    """The grid's part that the strategy reads before sending: the connected nodes."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


@pytest.fixture
def serverapp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The identity Flower gives a ServerApp's process, which messages are stamped with."""
    for name, value in (("_run_id", 7), ("_node_id", 1), ("_task_id", 3)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _strategy(experiment: Path, history: list[dict[str, Any]], lines: list[str]) -> Any:
    built = build_experiment(load_config(experiment), log=lambda _m: None)
    return MethodStrategy(
        global_model=built.global_model,
        method=built.method,
        schedule=built.schedule,
        guards=built.guards,
        nodes={0: 100, 1: 101, 2: 102},
        experiment_text="",
        history=history,
        log=lines.append,
    )


@pytest.mark.usefixtures("serverapp")
def test_a_node_gone_offline_is_named_and_not_a_timeout(experiment: Path) -> None:
    lines: list[str] = []
    strategy = _strategy(experiment, [], lines)
    messages = list(strategy.configure_train(1, None, None, _Grid([100, 101, 102])))
    for i, message in enumerate(messages):
        message.metadata.__dict__["_message_id"] = f"m{i}"  # as the grid numbers what it sends
    # The SuperLink answers for node 100, which missed its heartbeats; node 101 answers with an
    # error of its own; node 102 does not answer before the round timeout.
    offline = create_message_error_unavailable_res_message(messages[0].metadata, "node_unavail")
    broken = Message(Error(code=0, reason="no data-path"), reply_to=messages[1])
    strategy.aggregate_train(1, [offline, broken])
    record = strategy.history[-1]
    assert record["failed"] == {
        "0": OFFLINE,
        "1": "node error: no data-path",
        "2": "no reply before the round timeout",
    }
    assert f"round 1/2: client 0 (node 100) failed: {OFFLINE}" in lines


@pytest.mark.usefixtures("serverapp")
def test_a_resumed_run_says_which_fedssd_round_each_flower_round_is(experiment: Path) -> None:
    lines: list[str] = []
    strategy = _strategy(experiment, [{"round": 1}], lines)
    strategy.configure_train(1, None, None, _Grid([100, 101, 102]))
    assert "Flower's [ROUND 1] of this resumed run is round 2/2 of the fedssd run" in lines
