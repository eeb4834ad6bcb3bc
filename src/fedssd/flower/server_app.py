"""The Flower ServerApp: a fedssd experiment over Flower nodes, with the simulator's outputs.

The run config (``[tool.flwr.app.config]`` of the Flower App, or ``flwr run --run-config``)
names the same TOML file the CLI takes, plus overrides::

    config = "fedssd.toml"                      # relative to the App folder, or absolute
    overrides = "federation.rounds=5 method.name=ssd"
    out = "/abs/path/run"                       # "" = runs/flower-<run id> under the cwd
    overwrite = false
    round-timeout = 3600.0                      # seconds to wait for a round's replies
    connect-timeout = 300.0                     # seconds to wait for every client's node
    secure-aggregation = false                  # SecAgg+ (fedssd.flower.secagg, docs/privacy.md)
    secagg-clipping-range = 8.0                 # SecAgg+'s quantisation range [-c, c]

The server builds the experiment like :func:`fedssd.api.train` (data, model, method, schedule),
finds which node plays which client id, runs :class:`~fedssd.flower.strategy.MethodStrategy`
with the simulator's round callbacks (kNN monitor, ``metrics.jsonl``, checkpoints, progress)
and finishes with the same final evaluation and files, so ``fedssd report`` reads a Flower run
like any other.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedssd import config as config_module
from fedssd.api import (
    RunResult,
    build_experiment,
    check_setup,
    checkpointer,
    finish_run,
    load_config,
    round_callbacks,
    write_header,
)
from fedssd.errors import ConfigError
from fedssd.federation.store import ClientStore
from fedssd.flower import records, secagg
from fedssd.flower.strategy import MethodStrategy
from fedssd.outputs import check_run_dir, prepare_run_dir

Log = Callable[[str], None]

app = ServerApp()
_LOGGER = logging.getLogger("flwr")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The Flower run config of a fedssd run.

    Attributes:
        config: Path of the experiment TOML.
        overrides: ``dotted.key=value`` overrides applied on top.
        out: Output folder.
        overwrite: Replace an earlier run's files in ``out``.
        round_timeout: Seconds to wait for a round's replies.
        connect_timeout: Seconds to wait until every client id has a node.
        secure_aggregation: Aggregate with SecAgg+ (:mod:`fedssd.flower.secagg`).
        secagg_clipping_range: SecAgg+'s quantisation range ``c``.
    """

    config: Path
    overrides: tuple[str, ...] = ()
    out: Path = Path("runs/flower")
    overwrite: bool = False
    round_timeout: float = 3600.0
    connect_timeout: float = 300.0
    secure_aggregation: bool = False
    secagg_clipping_range: float = secagg.CLIPPING_RANGE

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, object], *, app_dir: Path | None, run_id: int
    ) -> RunSettings:
        """Read the run config (see the module docstring).

        Args:
            run_config: Flower's run config.
            app_dir: The installed Flower App folder, where a relative ``config`` is looked for
                first (then the working folder).
            run_id: Names the default output folder.

        Raises:
            ConfigError: A key is missing or of the wrong type.
        """

        def get(key: str, kind: type, default: object) -> object:
            value = run_config.get(key, default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind):
                raise ConfigError(
                    f"run config {key!r} must be a {kind.__name__}, got {value!r}; fix it in "
                    "[tool.flwr.app.config] or --run-config."
                )
            return value

        config = Path(str(get("config", str, "")))
        if not str(config) or str(config) == ".":
            raise ConfigError(
                "the run config has no 'config' (the experiment TOML); set it in "
                "[tool.flwr.app.config] or with --run-config 'config=\"path.toml\"'."
            )
        if not config.is_absolute() and app_dir is not None and (app_dir / config).is_file():
            config = app_dir / config
        out = str(get("out", str, ""))
        return cls(
            config=config.resolve(),
            overrides=tuple(shlex.split(str(get("overrides", str, "")))),
            out=Path(out) if out else Path("runs") / f"flower-{run_id}",
            overwrite=bool(get("overwrite", bool, False)),
            round_timeout=float(get("round-timeout", float, 3600.0)),  # type: ignore[arg-type]
            connect_timeout=float(get("connect-timeout", float, 300.0)),  # type: ignore[arg-type]
            secure_aggregation=bool(get("secure-aggregation", bool, False)),
            secagg_clipping_range=float(
                get("secagg-clipping-range", float, secagg.CLIPPING_RANGE)  # type: ignore[arg-type]
            ),
        )


def discover_clients(
    grid: Grid, *, num_clients: int, timeout: float, log: Log, poll: float = 0.5
) -> dict[int, int]:
    """Map each client id to the node playing it: ask every node for its ``partition-id``.

    Flower's node ids are random; client ids (and so sampling, seeds and DSR sets) come from the
    nodes' configs, so a run reproduces whatever ids the nodes get.

    Args:
        grid: Flower's grid.
        num_clients: Client ids 0 .. num_clients - 1 must all be present.
        timeout: Seconds to wait for nodes to connect and answer.
        log: Progress lines.
        poll: Seconds between looks at the connected nodes.

    Returns:
        Client id -> node id.

    Raises:
        ConfigError: Two nodes claim one id, a node's id is out of range, or not every client
            has a node within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    nodes: dict[int, int] = {}
    asked: set[int] = set()
    while True:
        new = sorted(set(grid.get_node_ids()) - asked)
        if new:
            asked.update(new)
            queries = [
                Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
                for node in new
            ]
            wait = max(1.0, deadline - time.monotonic())
            for reply in grid.send_and_receive(queries, timeout=wait):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    log(f"node {node} did not say which client it plays: {reply.error.reason}")
                    continue
                client_id = int(reply.content.metric_records["identity"]["client-id"])  # type: ignore[arg-type]
                if not 0 <= client_id < num_clients:
                    raise ConfigError(
                        f"node {node} has partition-id {client_id}, but the experiment has "
                        f"{num_clients} clients (ids 0..{num_clients - 1}); fix its node config."
                    )
                if client_id in nodes:
                    raise ConfigError(
                        f"nodes {nodes[client_id]} and {node} both have partition-id "
                        f"{client_id}; give every SuperNode its own id."
                    )
                nodes[client_id] = node
        missing = [k for k in range(num_clients) if k not in nodes]
        if not missing:
            return nodes
        if time.monotonic() > deadline:
            raise ConfigError(
                f"no node plays client(s) {missing} after {timeout:.0f}s; start a SuperNode "
                "with --node-config 'partition-id=K' for each of them."
            )
        time.sleep(poll)


def run_federation(
    grid: Grid, settings: RunSettings, *, log: Log
) -> tuple[RunResult, MethodStrategy]:
    """Build the experiment, run its rounds over the grid and write the run's files.

    Returns:
        The result (as :func:`fedssd.api.train` returns it) and the strategy (history, nodes).
    """
    started = time.perf_counter()
    cfg = load_config(settings.config, settings.overrides)
    check_run_dir(settings.out, overwrite=settings.overwrite)
    check_setup(cfg)
    experiment = build_experiment(cfg, log=log)
    if settings.secure_aggregation:
        secagg.check_secure_aggregation(cfg, experiment.method)
    nodes = discover_clients(
        grid, num_clients=cfg.federation.num_clients, timeout=settings.connect_timeout, log=log
    )
    out_dir = prepare_run_dir(settings.out, overwrite=settings.overwrite)
    write_header(out_dir, cfg, experiment.data)
    views = experiment.data.evaluation_views()
    callbacks = round_callbacks(cfg, views, experiment.device, out_dir, log)
    strategy = MethodStrategy(
        global_model=experiment.global_model,
        method=experiment.method,
        schedule=experiment.schedule,
        guards=experiment.guards,
        nodes=nodes,
        experiment_text=config_module.dumps(cfg),
        callbacks=callbacks,
        log=log,
    )
    if cfg.checkpoint.every:
        # Client states live on the nodes (their Context.state), so the store saved here is empty.
        callbacks.append(
            checkpointer(cfg, out_dir, experiment.method, ClientStore(), strategy.history)
        )
    log(
        f"training {cfg.method.name} on Flower: {cfg.federation.rounds} rounds, "
        f"{cfg.federation.num_clients} clients at fraction {cfg.federation.fraction}"
    )
    if settings.secure_aggregation:
        secagg.run_secure(
            grid,
            strategy,
            max_weight=secagg.max_batches(cfg, [len(p) for p in experiment.data.client_indices]),
            clipping_range=settings.secagg_clipping_range,
            timeout=settings.round_timeout,
        )
    else:
        strategy.start(
            grid,
            records.to_arrays(experiment.global_model.state_dict()),
            num_rounds=cfg.federation.rounds,
            timeout=settings.round_timeout,
            evaluate_fn=strategy.after_round,
        )
    result = finish_run(
        experiment, strategy.history, views=views, out_dir=out_dir, started=started, say=log
    )
    return result, strategy


def _app_dir(grid: Grid) -> Path | None:
    """The installed Flower App folder of this run (None when run without a FAB)."""
    from flwr.common.config import get_project_dir  # only needed here

    run = grid.run
    try:
        return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)
    except ValueError:
        return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's entry point: read the run config and run the federation."""
    settings = RunSettings.from_run_config(
        context.run_config, app_dir=_app_dir(grid), run_id=context.run_id
    )
    result, _ = run_federation(grid, settings, log=_LOGGER.info)
    _LOGGER.info("fedssd run written to %s", result.out_dir)
