"""A Flower strategy running a fedssd method: sampling, checks and aggregation as in the simulator.

:class:`MethodStrategy` samples client ids with :func:`fedssd.federation.sampling.sample_clients`
(the run seed and the round alone decide), sends each sampled client's node the global state, the
method's server state and the round's task, checks every reply with
the simulator's own :class:`fedssd.federation.server.RoundTally` and
:func:`fedssd.federation.server.conclude_round` (update checks, norm outliers, then
:func:`fedssd.methods.server.aggregate_updates`: the method's rule, else FedAvg). Updates are
aggregated in sample order whatever order the replies arrive in, so the float sums match the
in-process simulator's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedssd.errors import FedSSDError
from fedssd.federation.server import (
    Callback,
    Guards,
    RoundPlan,
    Schedule,
    conclude_round,
    open_round,
    run_callbacks,
)
from fedssd.flower import records
from fedssd.methods.protocol import Method
from fedssd.methods.server import server_state

Log = Callable[[str], None]
# Asks the given nodes which client id each plays: node id -> client id (of those that answered).
Identify = Callable[[Grid, Sequence[int]], Mapping[int, int]]


class ClientsFailed(FedSSDError):
    """Every client sent to in a round answered with an error (a broken node setup)."""


def _decoded(arrays: Mapping[str, ArrayRecord], key: str) -> dict[str, torch.Tensor]:
    """The tensors of a reply's ``key`` record (read only once a reply passed the cheap checks:
    a diverged client's reply holds none)."""
    return records.from_arrays(arrays[key])


class MethodStrategy(Strategy):
    """Runs a fedssd method over Flower nodes (see the module docstring).

    Args:
        global_model: The server's global model; updated in place after each round.
        method: The method (its server state travels to the clients every round).
        schedule: Rounds, sampling and learning rates.
        guards: Simulated faults and update validation.
        nodes: Client id -> Flower node id (from the nodes' ``partition-id``).
        experiment_text: The resolved config as TOML text, sent to the clients.
        callbacks: Called after each round with its record and the global model (kNN monitor,
            metrics file, checkpoints, progress), as :func:`fedssd.federation.simulator.run_rounds`
            calls them.
        history: The records of the rounds done so far (those of a checkpoint when resuming);
            the strategy appends to this list, so a checkpoint callback given the same list sees
            every round.
        run_key: Names the run on the nodes (their on-disk client state, see
            :mod:`fedssd.flower.node_state`); a resumed run keeps its key.
        identify: Asks nodes that joined after the start which client they play (a restarted
            SuperNode may come back with a new node id); None keeps the first mapping.
        log: Progress lines.
    """

    def __init__(
        self,
        *,
        global_model: nn.Module,
        method: Method,
        schedule: Schedule,
        guards: Guards,
        nodes: Mapping[int, int],
        experiment_text: str,
        callbacks: Sequence[Callback] = (),
        history: list[dict[str, Any]] | None = None,
        run_key: str = "",
        identify: Identify | None = None,
        log: Log = lambda _message: None,
    ) -> None:
        self.global_model = global_model
        self.method = method
        self.schedule = schedule
        self.guards = guards
        self.nodes = dict(nodes)
        # The client <-> node mapping is fixed once the nodes have identified themselves.
        self._node_to_client = {node: client for client, node in self.nodes.items()}
        self.experiment_text = experiment_text
        self.callbacks = callbacks
        self.log = log
        self.history: list[dict[str, Any]] = history if history is not None else []
        # Flower numbers the rounds of each start from 1; a resumed run starts after these.
        self.start_round = len(self.history)
        self.run_key = run_key
        self.identify = identify
        self._asked: set[int] = set()
        self._round: RoundPlan | None = None
        if guards.privacy is not None:
            guards.privacy.restore(self.history)

    def summary(self) -> None:
        """Log the run's shape."""
        self.log(
            f"fedssd strategy: {self.schedule.rounds} rounds, {self.schedule.num_clients} clients "
            f"at fraction {self.schedule.fraction}, nodes {self.nodes}"
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled client that does not crash (simulated faults)."""
        round_index = self.start_round + server_round - 1
        if self.identify is not None:
            self._rejoin(grid)
        plan = open_round(
            round_index,
            global_model=self.global_model,
            method=self.method,
            schedule=self.schedule,
            guards=self.guards,
        )
        self._round = plan
        global_record = records.to_arrays(plan.global_state)
        method_record = records.to_arrays(server_state(self.method))
        messages = []
        for position, client_id in enumerate(plan.clients):
            if plan.faults[client_id] == "crash":
                continue
            task = ConfigRecord(
                {
                    "experiment": self.experiment_text,
                    "round": round_index,
                    "lr": plan.lr,
                    "client-id": client_id,
                    "position": position,
                    "run-key": self.run_key,
                }
            )
            content = RecordDict(
                {records.GLOBAL: global_record, records.METHOD: method_record, records.TASK: task}
            )
            messages.append(
                Message(
                    content,
                    dst_node_id=self.nodes[client_id],
                    message_type=MessageType.TRAIN,
                    group_id=str(round_index + 1),
                )
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies as the simulator checks its clients, then aggregate with the method.

        Raises:
            ClientsFailed: Every client sent to answered with an error.
            TrainingDiverged: See :func:`conclude_round`.
        """
        current = self._round
        if current is None or current.index != self.start_round + server_round - 1:
            raise RuntimeError("aggregate_train was called without configure_train")
        by_client: dict[int, Message] = {}
        for message in replies:
            sender = self._node_to_client.get(message.metadata.src_node_id)
            if sender is not None:
                by_client[sender] = message
        device = next(iter(current.global_state.values())).device
        tally = current.tally()
        errors: list[str] = []
        for client_id in current.clients:
            fault = current.faults[client_id]
            reply = by_client.get(client_id)
            if fault == "crash":
                tally.failed[client_id] = "crashed"
            elif reply is None:
                tally.failed[client_id] = "no reply before the round timeout"
            elif reply.has_error():
                tally.failed[client_id] = f"node error: {reply.error.reason}"
                errors.append(tally.failed[client_id])
            else:
                arrays = reply.content.array_records
                tally.receive(
                    client_id,
                    fault,
                    records.metrics_to_result(reply.content.metric_records[records.RESULT]),
                    functools.partial(_decoded, arrays, records.STATE),
                    functools.partial(_decoded, arrays, records.PAYLOAD),
                    device=device,
                )
        sent = sum(1 for c in current.clients if current.faults[c] != "crash")
        if sent and len(errors) == sent:
            raise ClientsFailed(
                f"every client failed in round {server_round}; the first said: {errors[0]}"
            )
        new_state, record = conclude_round(current, tally, method=self.method, guards=self.guards)
        if new_state is not None:
            self.global_model.load_state_dict(new_state)
        self.history.append(record)
        metrics = MetricRecord(
            {
                "loss": float(record["loss"]),
                "accepted": int(record["accepted"]),
                "failed": len(record["failed"]),
                "rejected": len(record["rejected"]),
            }
        )
        return records.to_arrays(self.global_model.state_dict()), metrics

    def _rejoin(self, grid: Grid) -> None:
        """Map nodes that were not there at the last look (a SuperNode restarted under a new node
        id) to the client ids they play; a client id's newest node replaces its old one."""
        unknown = sorted(set(grid.get_node_ids()) - set(self._node_to_client) - self._asked)
        if not unknown:
            return
        assert self.identify is not None
        # A node that does not answer now is not asked again (it is not a fedssd client).
        self._asked.update(unknown)
        for node, client_id in self.identify(grid, unknown).items():
            if not 0 <= client_id < self.schedule.num_clients:
                self.log(f"node {node} plays client {client_id}, which is not in this run")
                continue
            old = self.nodes.get(client_id)
            if old is not None and old != node:
                self.log(f"client {client_id} rejoined as node {node} (was node {old})")
                self._node_to_client.pop(old, None)
            self.nodes[client_id] = node
            self._node_to_client[node] = client_id

    def after_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's server-side evaluation hook: run the round callbacks on the round's record.

        Called by :meth:`Strategy.start` before the first round (nothing to do) and after each.
        """
        if server_round == 0 or not self.history:
            return None
        record = self.history[-1]
        run_callbacks(self.callbacks, record, self.global_model)
        if "knn_acc" in record:
            return MetricRecord({"knn_acc": float(record["knn_acc"])})
        return None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: the server evaluates the global model itself."""
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Nothing to aggregate (see :meth:`configure_evaluate`)."""
        return None
