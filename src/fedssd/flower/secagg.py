"""Secure aggregation on Flower: the SecAgg+ protocol with Flower's own workflow and client mod.

Bell, Bonawitz, Gascon, Lepoint, Raykova, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS 2020. The server learns only the weighted sum of the clients' updates, never one
client's update; a client that drops out after the key exchange is recovered from the others'
Shamir shares of its mask key. Nothing here is cryptography: the protocol is Flower's
:class:`flwr.server.workflow.SecAggPlusWorkflow` (server) and
:func:`flwr.client.mod.secaggplus_mod` (client).

In Flower 1.42 the SecAgg+ workflow runs only inside the legacy ``DefaultWorkflow`` with a
legacy ``flwr.server.strategy.Strategy`` (``LegacyContext``, ``configure_fit`` /
``aggregate_fit``); the Message-API strategies (``flwr.serverapp.strategy``) that
:class:`~fedssd.flower.strategy.MethodStrategy` builds on have no secure aggregation. So a
secure run drives the same fedssd round logic through :class:`SecAggStrategy`, a legacy strategy
that shares the :class:`~fedssd.flower.strategy.MethodStrategy`'s model, method, schedule,
callbacks and history:

- ``configure_fit`` opens the round with the simulator's
  :func:`~fedssd.federation.server.open_round` and sends each sampled client the global state (as
  legacy ``Parameters``, in state-dict order) and its task (round, learning rate, client id,
  position, the method's server state) in the ``FitIns`` config.
- On the node, :func:`secure_aggregation_mod` hands SecAgg+ messages to ``secaggplus_mod``,
  whose masked-vector stage calls the ordinary fedssd ``train`` handler through a translation:
  the legacy ``FitIns`` becomes the usual fedssd task, the reply becomes a ``FitRes`` whose
  parameters are the update ``state - global`` and whose ``num_examples`` is the number of local
  mini-batches (FedAvg's weight). Messages without SecAgg+ configs pass through untouched.
- Weighting under masking (Flower's scheme): each client multiplies its update by
  ``w / max_weight`` (``w``: its batches; ``max_weight``: the most batches any client can have in
  a round, from the data split), quantises it and appends the quantised weight to the same masked
  vector; the server unmasks ``sum(w x)`` and ``sum(w)`` together and divides, so it gets
  exactly FedAvg's weighted mean without seeing any one ``w x``.
- Quantisation: each entry of ``(w / max_weight) * delta`` is clipped to ``[-c, c]`` (run config
  ``secagg-clipping-range``, default 8) and stochastically rounded to one of ``Q`` levels
  (:func:`quantization_levels`: ``2^22``, lowered for cohorts of 1,024 clients or more so that
  the sum never wraps Flower's ``2^32`` modulus); per entry the mean's error is at most
  ``n * (2c / Q) / sum_k(w_k / max_weight)``. A client whose scaled update leaves ``[-c, c]``
  says so (one flag, not its values) and the round stops with one sentence instead of silently
  aggregating clipped values.
- ``aggregate_fit`` receives only the unmasked mean (Flower gives every result the same
  aggregated parameters) and the range flags; each client's loss and batch count only when the
  run config sets ``secagg-client-metrics = true`` (:func:`secure_aggregation_mod` removes them
  from the reply otherwise). It concludes the round like the simulator
  (:func:`~fedssd.federation.server.conclude_round`: the round record, callbacks, checkpoints).

Distributed DP (``privacy.mode = "distributed"``): the task also carries the clip norm and the
deviation of each client's noise share; the client sends its clipped, weighted update plus its
own share (:func:`~fedssd.federation.privacy.noised_share`, drawn from a secret of its own) with
weight 1 and nothing else in the clear; the reconstruction threshold is the fewest shares the
noise is planned for, and the server releases the unmasked sum through
:meth:`~fedssd.federation.privacy.PrivateAggregator.release_sum` (docs/privacy.md).

Refused before the run (:func:`check_secure_aggregation`): methods whose server step reads each
update (L-DAWA, FedU2, Orchestra, FedEMA: they implement ``aggregate``), the server's per-update
norm check (``validation.max_norm_ratio``), simulated faults, Poisson sampling (the cohort must
have a fixed size), and central DP (its clipping needs each update on the server).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fedssd.config import Config
from fedssd.errors import ConfigError, TrainingDiverged
from fedssd.federation.client import LocalResult
from fedssd.federation.privacy import (
    PrivateAggregator,
    SecureSum,
    noised_share,
    share_generator,
)
from fedssd.federation.sampling import clients_per_round
from fedssd.federation.server import (
    RoundPlan,
    client_weight,
    conclude_round,
    open_round,
    run_callbacks,
)
from fedssd.flower import records
from fedssd.flower.strategy import MethodStrategy
from fedssd.methods.protocol import Aggregates, ClientUpdate, Method
from fedssd.methods.server import server_state

# FitIns config keys beside the fedssd task (records.TASK's keys).
_KEYS = "state-keys"
_SENT = "sent-keys"
_METHOD = "method-state"
_CLIPPED = "secagg-clipped"
# Distributed DP: what each client needs to clip its update and draw its noise share.
_DP_CLIP = "dp-clip-norm"
_DP_SHARE = "dp-share-std"
_DP_CAP = "dp-weight-cap"
_DP_SEED = "dp-noise-seed"
_DP_KEYS = (_DP_CLIP, _DP_SHARE, _DP_CAP, _DP_SEED)
# Where Flower's legacy FitRes keeps its metrics and example count in a reply.
_FIT_METRICS = "fitres.metrics"
_FIT_EXAMPLES = "fitres.num_examples"
# The Flower run config key that lets the clients send their loss and batch count in the clear.
CLIENT_METRICS = "secagg-client-metrics"
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
# Flower's SecAgg+ adds the quantised vectors modulo 2^32.
MODULUS_RANGE = 2**32


def quantization_levels(cohort: int) -> int:
    """SecAgg+'s quantisation levels for a cohort of ``cohort`` clients: ``2^22``, lowered so
    that the sum of ``cohort`` quantised entries (each in ``[0, levels]``) and of their weights
    stays below the modulus ``2^32`` and never wraps (from 1,024 clients on)."""
    return min(QUANTIZATION_RANGE, (MODULUS_RANGE - 1) // max(1, cohort))


def check_secure_aggregation(config: Config, method: Method) -> None:
    """Refuse what secure aggregation cannot run, in one sentence naming the reason.

    Raises:
        ConfigError: The method or a setting needs each client's update on the server.
    """
    fed = config.federation
    if isinstance(method, Aggregates):
        raise ConfigError(
            f"secure aggregation shows the server only the weighted sum of the updates, but "
            f"{type(method).__name__}'s server step reads each update (its own aggregate); use a "
            "FedAvg method (e.g. ssd, fedalignuniform) or turn secure-aggregation off."
        )
    if config.validation.max_norm_ratio > 0:
        raise ConfigError(
            "secure aggregation hides each update's norm from the server, so the per-update norm "
            "check cannot run; set validation.max_norm_ratio = 0 to use it."
        )
    faults = config.faults
    if faults.crash or faults.straggle or faults.drop:
        raise ConfigError(
            "simulated faults ([faults]) are not available with secure aggregation, where real "
            "dropouts are handled by the protocol; set faults.crash, straggle and drop to 0."
        )
    if config.privacy.dp != "off" and config.privacy.mode != "distributed":
        raise ConfigError(
            "central differential privacy clips and noises each update on the server, which "
            "secure aggregation hides; set privacy.mode = 'distributed' (each client clips and "
            "adds its share of the noise) or turn one of them off."
        )
    if fed.sampling == "poisson" and fed.fraction < 1:
        raise ConfigError(
            "secure aggregation sizes its quantisation and its dropout recovery for a fixed "
            "cohort, but Poisson sampling varies it from round to round; set "
            "federation.sampling = 'fixed'."
        )
    if clients_per_round(num_clients=fed.num_clients, fraction=fed.fraction) < 3:
        raise ConfigError(
            "secure aggregation needs at least 3 clients per round (SecAgg+ reconstructs a "
            "dropped client's masks from 2 others' shares); raise federation.num_clients or "
            "federation.fraction."
        )


def max_batches(config: Config, client_sizes: list[int]) -> int:
    """The most local mini-batches any client can train in a round (SecAgg+'s ``max_weight``)."""
    fed = config.federation
    return max(1, fed.local_epochs * max(math.ceil(n / fed.batch_size) for n in client_sizes))


# ----------------------------------------------------------------------------- server


class SecAggStrategy(LegacyStrategy):
    """The fedssd round logic as a legacy Flower strategy, for :class:`SecAggPlusWorkflow`.

    Args:
        inner: The run's :class:`MethodStrategy` (model, method, schedule, callbacks, history
            and the node map are shared with it).
    """

    def __init__(self, inner: MethodStrategy) -> None:
        self.inner = inner
        self._round: RoundPlan | None = None

    def __repr__(self) -> str:
        return "SecAggStrategy(fedssd)"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The global model's state, in state-dict order."""
        state = self.inner.global_model.state_dict()
        return ndarrays_to_parameters([v.detach().cpu().numpy() for v in state.values()])

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """One ``FitIns`` per sampled client: the global state and the fedssd task."""
        inner = self.inner
        plan = open_round(
            server_round - 1,
            global_model=inner.global_model,
            method=inner.method,
            schedule=inner.schedule,
            guards=inner.guards,
        )
        client_manager.wait_for(len(inner.nodes), timeout=600)
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        self._round = plan
        global_state = plan.global_state
        arrays = ndarrays_to_parameters([v.cpu().numpy() for v in global_state.values()])
        method_state = server_state(inner.method)
        shared: dict[str, Any] = {
            "experiment": inner.experiment_text,
            "round": plan.index,
            "lr": plan.lr,
            _KEYS: json.dumps(list(global_state)),
            _SENT: json.dumps(list(plan.expected)),
            _METHOD: save_bytes({k: v.cpu().contiguous() for k, v in method_state.items()}),
            **_private_task(inner.guards.privacy),
        }
        return [
            (
                proxies[inner.nodes[client_id]],
                FitIns(arrays, {**shared, "client-id": client_id, "position": position}),
            )
            for position, client_id in enumerate(plan.clients)
        ]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Any]]:
        """Conclude the round from the unmasked weighted mean of the updates.

        Raises:
            TrainingDiverged: A client's scaled update left the quantisation range, or the
                aggregate is not finite (see :func:`conclude_round`).
        """
        inner, plan = self.inner, self._round
        if plan is None or plan.index != server_round - 1:
            raise RuntimeError("aggregate_fit was called without configure_fit")
        node_to_client = {node: client for client, node in inner.nodes.items()}
        replied: dict[int, FitRes] = {}
        for proxy, fitres in results:
            client = node_to_client.get(proxy.node_id)
            if client is not None:
                replied[client] = fitres
        if any(bool(fitres.metrics.get(_CLIPPED)) for fitres in replied.values()):
            how = (
                "(set from the clip norm and the noise share: an event the run's dp_range_delta "
                "bounds)"
                if inner.guards.privacy is not None
                else "; raise the run config's secagg-clipping-range"
            )
            raise TrainingDiverged(
                f"in round {server_round} a client's update left SecAgg+'s quantisation range "
                f"and would be aggregated clipped {how} (the last good checkpoint, if any, is "
                "kept)."
            )
        tally = plan.tally()
        tally.failed.update(
            {c: "dropped out of secure aggregation" for c in plan.clients if c not in replied}
        )
        # Clients send their loss and batch count only when the run config asks for them;
        # without them every client in the sum counts as contributing.
        told = {c: _result_of(replied[c]) for c in plan.clients if c in replied}
        tally.results.extend(result for result in told.values() if result is not None)
        contributing = [
            c for c in plan.clients if c in replied and (told[c] is None or replied[c].num_examples)
        ]
        privacy = inner.guards.privacy
        if privacy is not None and replied:
            # Distributed DP: every reply is in the sum with its noise share (a client with
            # nothing to send sent its share alone); each counts 1, so the unmasked mean times
            # the replies is the sum.
            contributing = [c for c in plan.clients if c in replied]
            mean = parameters_to_ndarrays(next(iter(replied.values())).parameters)
            total = {
                key: torch.from_numpy(np.asarray(delta) * len(replied)).float().reshape(base.shape)
                for (key, base), delta in zip(plan.expected.items(), mean, strict=True)
                if base.is_floating_point()
            }
            tally.secure_sum = SecureSum(total, len(replied))
        elif contributing:
            mean = parameters_to_ndarrays(next(iter(replied.values())).parameters)
            state: dict[str, torch.Tensor] = {}
            for key, delta in zip(plan.expected, mean, strict=True):
                base = plan.global_state[key]
                change = torch.from_numpy(np.asarray(delta)).double().reshape(base.shape)
                moved = base.double() + change.to(base.device)
                state[key] = (moved if base.is_floating_point() else moved.round()).to(base.dtype)
            # One update standing for the unmasked mean: FedAvg of it alone is itself.
            tally.updates.append(ClientUpdate(-1, state, 1.0))
        new_state, record = conclude_round(plan, tally, method=inner.method, guards=inner.guards)
        record["accepted"] = len(contributing)
        record["secure_aggregation"] = True
        if new_state is not None:
            inner.global_model.load_state_dict(new_state)
        inner.history.append(record)
        return self.initialize_parameters(None), {"loss": float(record["loss"])}  # type: ignore[arg-type]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[Any]:
        """No client-side evaluation: the server evaluates the global model itself."""
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[float | None, dict[str, Any]]:
        """Nothing to aggregate."""
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Any]] | None:
        """After each round: the round callbacks (kNN monitor, metrics file, checkpoints)."""
        history = self.inner.history
        if server_round == 0 or not history:
            return None
        if history[-1]["round"] != server_round:
            # SecAgg+ halted (fewer clients left than its threshold): nothing was unmasked,
            # aggregated or released, and the round spent no privacy.
            self.inner.log(
                f"round {server_round}: secure aggregation halted with too few clients left; "
                "the global model is unchanged and the round is not recorded"
            )
            return None
        run_callbacks(self.inner.callbacks, history[-1], self.inner.global_model)
        return None


def _result_of(fitres: FitRes) -> LocalResult | None:
    """The client's local result from its ``FitRes`` metrics (None: it sent none)."""
    metrics = {k: v for k, v in fitres.metrics.items() if k != _CLIPPED}
    if not metrics:
        return None
    return records.metrics_to_result(MetricRecord(metrics))  # type: ignore[arg-type]


def run_secure(
    grid: Grid,
    strategy: MethodStrategy,
    *,
    max_weight: int,
    clipping_range: float = CLIPPING_RANGE,
    timeout: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Run every round of ``strategy`` with SecAgg+ (its history and callbacks fill as usual).

    Under distributed DP every client counts 1 (``max_weight`` 1), the quantisation range comes
    from the clip norm and the noise share (:meth:`~fedssd.federation.privacy.
    PrivateAggregator.quantisation_range`, not ``clipping_range``), and the reconstruction
    threshold is the fewest noise shares the accountant assumes
    (:attr:`~fedssd.federation.privacy.PrivateAggregator.min_shares`).

    Args:
        grid: Flower's grid.
        strategy: The run's strategy (built as for a plain run).
        max_weight: The most local mini-batches any client can have in a round.
        clipping_range: ``c``: scaled update entries must lie in ``[-c, c]``.
        timeout: Seconds to wait for each stage's replies (None: no limit).
        log: Where the settings of a distributed DP run are said.
    """
    schedule = strategy.schedule
    cohort = clients_per_round(num_clients=schedule.num_clients, fraction=schedule.fraction)
    privacy = strategy.guards.privacy
    # Half of the cohort (at least 2) recovers a dropout; SecAgg+ alone.
    threshold: float | int = 0.5
    if privacy is not None:
        max_weight, clipping_range, threshold = 1, privacy.quantisation_range(), privacy.min_shares
        log(
            f"distributed DP: each of the {cohort} clients clips its update to "
            f"{privacy.clip_norm:g} and adds noise of std {privacy.share_std():.4g} (z = "
            f"{privacy.noise_multiplier:.4g} on the full sum); SecAgg+ unmasks a sum only with "
            f"at least {threshold} clients in it, quantised over [-{clipping_range:.4g}, "
            f"{clipping_range:.4g}] (from the clip norm and the noise; secagg-clipping-range is "
            "not used)"
        )
    context = LegacyContext(
        Context(
            run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
        ),
        config=ServerConfig(num_rounds=strategy.schedule.rounds, round_timeout=timeout),
        strategy=SecAggStrategy(strategy),
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=1.0,  # every sampled client holds a share of every other's keys
            reconstruction_threshold=threshold,
            max_weight=float(max_weight),
            clipping_range=clipping_range,
            quantization_range=quantization_levels(cohort),
            timeout=timeout,
        )
    )
    workflow(grid, context)
    if len(strategy.history) < strategy.schedule.rounds:
        raise TrainingDiverged(
            f"secure aggregation stopped after {len(strategy.history)} of "
            f"{strategy.schedule.rounds} rounds (too few clients answered a SecAgg+ stage to "
            "recover the sum; see the server log); the last good checkpoint, if any, is kept."
        )


# ----------------------------------------------------------------------------- client


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod: SecAgg+ for messages that carry its configs, nothing for the others.

    The reply of the masked-vector stage keeps, in the clear, only the range flag: the client's
    batch count (SecAgg+ has already put it into the masked vector) and its loss are removed
    unless the run config sets ``secagg-client-metrics = true``.
    """
    from flwr.client.mod import secaggplus_mod

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)
    reply = secaggplus_mod(msg, ctxt, _translated(call_next))
    if not bool(ctxt.run_config.get(CLIENT_METRICS, False)):
        _withhold_metrics(reply.content)
    return reply


def _withhold_metrics(content: RecordDict) -> None:
    """Drop a masked-vector reply's clear-text metrics and batch count (the range flag stays)."""
    metrics = content.config_records.get(_FIT_METRICS)
    if metrics is None:
        return
    content.config_records[_FIT_METRICS] = ConfigRecord({_CLIPPED: metrics.get(_CLIPPED, False)})
    content.metric_records[_FIT_EXAMPLES] = MetricRecord({"num_examples": 0})


def _translated(call_next: ClientAppCallable) -> Callable[[Message, Context], Message]:
    """The fedssd ``train`` handler behind a legacy ``FitIns`` -> ``FitRes`` translation."""

    def handle(msg: Message, ctxt: Context) -> Message:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fitins.config)
        keys = json.loads(str(config.pop(_KEYS)))
        sent = json.loads(str(config.pop(_SENT)))
        method_state = load_bytes(cast(bytes, config.pop(_METHOD)))
        private = {k: config.pop(k) for k in _DP_KEYS if k in config}
        arrays = parameters_to_ndarrays(fitins.parameters)
        global_state = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}
        msg.content = RecordDict(
            {
                records.GLOBAL: records.to_arrays(global_state),
                records.METHOD: records.to_arrays(method_state),
                records.TASK: ConfigRecord(config),  # type: ignore[arg-type]
            }
        )
        reply = call_next(msg, ctxt)
        content = reply.content
        metrics = dict(content.metric_records[records.RESULT])
        if private:
            # Distributed DP: the clipped update plus this client's noise share, counting 1.
            # Nothing else leaves in the clear (not even with secagg-client-metrics): the
            # server must learn nothing about one client's data beyond the noised sum.
            weight, deltas = 1, _private_share(private, global_state, sent, content, config)
            metrics = {}
        else:
            # A client with nothing to send (diverged, no batches) sends zeros at weight 0:
            # every client's masked vector must have the same shapes.
            weight = 0
            deltas = [np.zeros(tuple(global_state[k].shape), dtype=np.float64) for k in sent]
            if records.STATE in content.array_records:
                state = records.from_arrays(content.array_records[records.STATE])
                result = records.metrics_to_result(content.metric_records[records.RESULT])
                # FedAvg's weight (central DP, with its own weights, is refused with SecAgg+).
                weight = int(client_weight(result.num_batches, None))
                deltas = [(state[k].double() - global_state[k].double()).numpy() for k in sent]
        # As 1-d at least: Flower's dequantisation shifts each array in place, which a 0-d array
        # (BatchNorm's batch counter) does not survive.
        deltas = [np.atleast_1d(d) for d in deltas]
        metrics[_CLIPPED] = _leaves_range(deltas, weight, ctxt)
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters(deltas),
            num_examples=weight,
            metrics=metrics,  # type: ignore[arg-type]
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    return handle


def _private_task(privacy: PrivateAggregator | None) -> dict[str, Any]:
    """What a distributed DP client needs in its task: the clip norm, its noise share's
    deviation, the public weight cap (0: uniform weights) and, with ``reproducible_noise``
    (tests only), the run seed its share is drawn from (-1: a secret of its own)."""
    if privacy is None:
        return {}
    cfg = privacy.config
    return {
        _DP_CLIP: float(privacy.clip_norm),
        _DP_SHARE: float(privacy.share_std()),
        _DP_CAP: float(cfg.weight_cap if cfg.weighting == "batches" else 0.0),
        _DP_SEED: -1 if privacy.randomness.seed is None else privacy.randomness.seed,
    }


def _private_share(
    private: dict[str, Any],
    global_state: dict[str, torch.Tensor],
    sent: list[str],
    content: RecordDict,
    task: dict[str, Any],
) -> list[np.ndarray]:
    """A distributed DP client's vector: its clipped, weighted update plus its noise share
    (:func:`~fedssd.federation.privacy.noised_share`); its share alone when it has no finite
    update to send."""
    state, weight = None, 0.0
    if records.STATE in content.array_records:
        result = records.metrics_to_result(content.metric_records[records.RESULT])
        if result.finite and result.num_batches > 0:
            state = records.from_arrays(content.array_records[records.STATE])
            cap = float(private[_DP_CAP])
            weight = 1.0 if cap <= 0 else min(float(result.num_batches), cap) / cap
    seed = int(private[_DP_SEED])
    share = noised_share(
        global_state,
        state,
        keys=sent,
        clip_norm=float(private[_DP_CLIP]),
        weight=weight,
        std=float(private[_DP_SHARE]),
        rng=share_generator(None if seed < 0 else seed, int(task["round"]), int(task["client-id"])),
    )
    return [share[k].double().numpy() for k in sent]


def _leaves_range(deltas: list[np.ndarray], weight: int, ctxt: Context) -> bool:
    """Whether ``(weight / max_weight) * delta`` leaves SecAgg+'s ``[-c, c]`` anywhere."""
    state = ctxt.state.config_records.get(RECORD_KEY_STATE, ConfigRecord({}))
    max_weight = float(state.get("max_weight", 0.0) or 0.0)  # type: ignore[arg-type]
    clipping = float(state.get("clipping_range", 0.0) or 0.0)  # type: ignore[arg-type]
    if not weight or max_weight <= 0 or clipping <= 0:
        return False
    largest = max((float(np.abs(d).max()) for d in deltas if d.size), default=0.0)
    return largest * weight / max_weight > clipping


__all__ = [
    "SecAggStrategy",
    "check_secure_aggregation",
    "max_batches",
    "run_secure",
    "secure_aggregation_mod",
]
