"""Test hooks around fedssd's ServerApp and ClientApp, shipped inside a test copy of the Flower
App (tests/deployment_testing.py), each off unless its run config key is set:

- ``test-kill-client`` / ``test-kill-round``: when that client's node receives the task of that
  round (fedssd's numbering, from 1), its SuperNode, the SuperNode's SuperExec and the ClientApp
  are killed with SIGKILL: the site's machine goes down at a known moment.
- ``test-drop-client`` / ``test-drop-round``: that client fails in SecAgg+'s masked-vector stage
  of that round (after the key exchange: the dropout the protocol recovers from).
- ``test-hold-round`` / ``test-hold-file``: after that round (its checkpoint written) the ServerApp
  waits until the file exists, so that the test can act between two rounds.
- ``test-crash-round`` / ``test-crash-pidfile``: after that round the ServerApp kills the process
  whose id the file holds (the SuperLink) and then itself, with SIGKILL: the coordinator goes
  down at a known moment.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid, ServerApp

from fedssd.flower import client_app, server_app
from fedssd.flower.records import TASK
from fedssd.flower.secagg import secure_aggregation_mod
from fedssd.flower.strategy import MethodStrategy

HOLD_LIMIT = 900.0  # seconds a held ServerApp waits before it gives up (a test that hung)


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _hooks(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    config = context.run_config
    client = client_app.client_id_of(context)
    task = message.content.config_records.get(TASK)
    if (
        task is not None
        and "round" in task
        and client == config.get("test-kill-client")
        and int(task["round"]) + 1 == config.get("test-kill-round")  # type: ignore[arg-type]
    ):
        superexec = os.getppid()
        for pid in (_parent_of(superexec), superexec, os.getpid()):
            os.kill(pid, signal.SIGKILL)
    secagg = message.content.config_records.get(RECORD_KEY_CONFIGS)
    if (
        secagg is not None
        and secagg.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
        and client == config.get("test-drop-client")
        and message.metadata.group_id == str(config.get("test-drop-round"))
    ):
        raise RuntimeError("simulated dropout")
    return call_next(message, context)


client = ClientApp(mods=[_hooks, secure_aggregation_mod])
client.train()(client_app.train_client)
client.query()(client_app.identify)
client.evaluate()(client_app.evaluate_client)

server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    after_round = MethodStrategy.after_round

    def hooked(self: MethodStrategy, server_round: int, arrays: Any) -> Any:
        result = after_round(self, server_round, arrays)
        done = len(self.history) if server_round else 0
        if done and done == config.get("test-hold-round"):
            hold = Path(str(config["test-hold-file"]))
            deadline = time.monotonic() + HOLD_LIMIT
            while not hold.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        if done and done == config.get("test-crash-round"):
            os.kill(int(Path(str(config["test-crash-pidfile"])).read_text()), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    MethodStrategy.after_round = hooked  # type: ignore[method-assign]
    server_app.main(grid, context)
