"""What travels in Flower messages and persists in a node's context, as Flower records.

Tensors travel as :class:`flwr.app.ArrayRecord` (numpy ``.npy`` bytes, never pickle); numbers and
text as :class:`~flwr.app.ConfigRecord` / :class:`~flwr.app.MetricRecord`. These functions are
pure conversions, so that the client and the server agree on one layout.

Record names used in a message (the content of one :class:`~flwr.app.RecordDict`):

``global``
    The full global model state (server -> client), including the method's local modules, whose
    global values seed a client the first time it trains.
``method``
    The method's server-side state (:func:`fedssd.methods.server.server_state`: SSD's scaling
    sets, FedEMA's lambdas; empty for most methods), loaded by the client's method before
    training, exactly as the in-process simulator's shared method object would see it.
``task``
    The round's instructions: resolved experiment config (TOML text), round index, learning
    rate, the client id the server expects and its position in the round's sample.
``state`` / ``payload`` / ``result``
    The client's reply: the model state without the method's local keys, the method's extra
    tensors and the local training result.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedssd.federation.client import LocalResult
from fedssd.methods.protocol import ClientState

GLOBAL = "global"
METHOD = "method"
TASK = "task"
STATE = "state"
PAYLOAD = "payload"
RESULT = "result"

# data.partition of a run on the sites' own data: each node holds one client's images alone.
SITES = "clients"

_PART = "part."


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``state`` as an ArrayRecord (tensors copied to the CPU; dtypes and shapes kept)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of ``record`` (CPU, writable copies), in the record's order."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def result_to_metrics(result: LocalResult) -> MetricRecord:
    """A local training result as a MetricRecord (loss parts under ``part.<name>``)."""
    record = MetricRecord(
        {
            "client-id": result.client_id,
            "num-batches": result.num_batches,
            "num-samples": result.num_samples,
            "loss": result.loss,
            "seconds": result.seconds,
        }
    )
    for name, value in result.parts.items():
        record[_PART + name] = value
    return record


def metrics_to_result(record: MetricRecord) -> LocalResult:
    """The :class:`LocalResult` that :func:`result_to_metrics` wrote."""
    return LocalResult(
        client_id=int(_scalar(record["client-id"])),
        num_batches=int(_scalar(record["num-batches"])),
        num_samples=int(_scalar(record["num-samples"])),
        loss=float(_scalar(record["loss"])),
        parts={
            k[len(_PART) :]: float(_scalar(v)) for k, v in record.items() if k.startswith(_PART)
        },
        seconds=float(_scalar(record["seconds"])),
    )


def _scalar(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _state_keys(client_id: int, run_key: str) -> tuple[str, str]:
    prefix = f"fedssd.{run_key}.client.{client_id}" if run_key else f"fedssd.client.{client_id}"
    return f"{prefix}.tensors", f"{prefix}.meta"


def save_client_state(
    state: RecordDict, client_id: int, kept: ClientState, *, run_key: str = ""
) -> None:
    """Keep ``kept`` in a node's context state under the client's id (not the node id) and the
    server's run key (so that a later run on the same nodes starts afresh)."""
    tensors_key, meta_key = _state_keys(client_id, run_key)
    state[tensors_key] = to_arrays(kept.tensors)
    meta = ConfigRecord({"last-round": kept.last_round, "participations": kept.participations})
    for name, value in kept.scalars.items():
        meta["scalar." + name] = float(value)
    state[meta_key] = meta


def load_client_state(
    state: RecordDict, client_id: int, *, run_key: str = ""
) -> ClientState | None:
    """The client's state kept by :func:`save_client_state` in the run ``run_key``, or None
    before it first trained in that run."""
    tensors_key, meta_key = _state_keys(client_id, run_key)
    if meta_key not in state:
        return None
    meta = state.config_records[meta_key]
    tensors = state.array_records[tensors_key]
    return ClientState(
        tensors=from_arrays(tensors),
        scalars={
            k[len("scalar.") :]: float(_scalar(v))
            for k, v in meta.items()
            if k.startswith("scalar.")
        },
        last_round=int(_scalar(meta["last-round"])),
        participations=int(_scalar(meta["participations"])),
    )
