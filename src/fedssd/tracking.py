"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, as round callbacks.

A run reports to the trackers its ``[tracking]`` table names (``backends = "tensorboard,wandb"``,
or ``--track`` on the command line): after every round the round's scalars (loss and its parts,
kNN accuracy on monitor rounds, learning rate, sampled / accepted / failed clients, seconds),
at the end the final summary, and at the start the resolved config (TensorBoard hparams and a
text copy; W&B config; MLflow params). Every entry point uses the same three calls:

    trackers = make_trackers(config, out_dir, say=log)        # before the first round
    callbacks += tracker_callbacks(trackers)                   # with the other round callbacks
    finish_trackers(trackers, summary)                         # at the end (None: failed)

A tracker that fails (disk full, server gone) logs one warning and is switched off: tracking
never stops a run. A missing package is found before training starts
(:func:`check_tracking`) and named in one sentence with the extra that installs it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedssd.config import Config, parse_backends
from fedssd.errors import ConfigError
from fedssd.runs.outputs import write_json

if TYPE_CHECKING:
    from torch import nn

    from fedssd.federation.simulator import Callback

Log = Callable[[str], None]

# Backend -> (module whose import proves it is installed, extra that installs it).
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
STATE_FILE = "tracking.json"  # the trackers' run ids, so that a resumed run continues them


class Tracker(Protocol):
    """One experiment tracker of one run."""

    name: str

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record a round's scalars at ``step`` (the 1-based round)."""
        ...

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        """Record the final summary and close (``None``: the run failed or was interrupted)."""
        ...


def check_tracking(config: Config) -> None:
    """Refuse, before anything runs, a backend whose package is not installed.

    Raises:
        ConfigError: One sentence naming the extra to install.
    """
    for name in parse_backends(config.tracking.backends):
        module, extra = BACKENDS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f"tracking with {name} needs the {module} package; install it with "
                f"pip install 'fedssd[{extra}]' (or drop {name} from tracking.backends)."
            ) from None


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a round's record worth a curve: every numeric entry but the round itself,
    plus the counts of sampled, accepted, failed and rejected clients and whether it was
    skipped."""
    scalars = {
        key: float(value) for key, value in record.items() if key != "round" and _is_number(value)
    }
    if isinstance(record.get("clients"), Sequence):
        scalars["sampled_clients"] = float(len(record["clients"]))
    if isinstance(record.get("failed"), Mapping):
        scalars["failed_clients"] = float(len(record["failed"]))
    if isinstance(record.get("rejected"), Mapping):
        scalars["rejected_clients"] = float(len(record["rejected"]))
    if "accepted" in record:
        scalars["accepted_clients"] = scalars.pop("accepted", 0.0)
    if isinstance(record.get("skipped"), bool):
        scalars["skipped"] = float(record["skipped"])
    return scalars


def summary_scalars(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a run's summary (lists such as the K x K matrix left out)."""
    return {key: float(value) for key, value in summary.items() if _is_number(value)}


def flat_config(config: Config) -> dict[str, Any]:
    """The resolved config as ``{"federation.lr": 0.1, ...}`` (lists as text)."""
    from fedssd import config as config_module

    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, bool | int | float | str):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    walk("", config_module.to_dict(config))
    return flat


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- the trackers


class TensorBoardTracker:
    """Event files in ``log_dir`` (``<run>/tensorboard``): ``round/<key>`` scalars per round,
    ``summary/<key>`` at the end, the config as hparams and as text."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, config: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from fedssd import config as config_module

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.hparams = flat_config(config)
        self.rounds = config.federation.rounds
        self.writer.add_text("config", "```toml\n" + config_module.dumps(config) + "```", 0)

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None:
        """One ``round/<key>`` scalar per entry."""
        for key, value in scalars.items():
            self.writer.add_scalar(f"round/{key}", value, step)
        self.writer.flush()

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        """The summary scalars and the hparams (config -> final metrics), then close."""
        from torch.utils.tensorboard.summary import hparams

        if summary is not None:
            metrics = {f"summary/{k}": v for k, v in summary_scalars(summary).items()}
            experiment, start, end = hparams(self.hparams, metrics)
            file_writer = self.writer.file_writer
            assert file_writer is not None  # open until close()
            for event in (experiment, start, end):
                file_writer.add_summary(event)
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, self.rounds)
        self.writer.close()


def wandb_mode(requested: str) -> str:
    """``online`` or ``offline``: ``WANDB_MODE`` wins; ``auto`` is online only when W&B has an
    API key (environment or ``~/.netrc``), so a machine without an account never blocks."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    try:
        if "api.wandb.ai" in netrc.read_text(encoding="utf-8"):
            return "online"
    except OSError:
        pass
    return "offline"


class WandbTracker:
    """A W&B run (online, or offline under ``<run>/wandb`` for ``wandb sync`` later)."""

    name = "wandb"

    def __init__(
        self,
        config: Config,
        *,
        folder: Path | None,
        run_name: str,
        group: str,
        resume_id: str | None,
    ) -> None:
        import wandb

        from fedssd import config as config_module

        tracking = config.tracking
        self.run = wandb.init(
            project=tracking.project,
            entity=tracking.wandb_entity or None,
            group=group or None,
            name=run_name or None,
            dir=None if folder is None else str(folder),
            config=config_module.to_dict(config),
            mode=wandb_mode(tracking.wandb_mode),  # type: ignore[arg-type]
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="create_new",
            settings=wandb.Settings(quiet=True, console="off"),
        )
        self.id: str = self.run.id

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None:
        """One history row per round."""
        self.run.log(dict(scalars), step=step)

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        """The summary into the run's summary; exit code 1 when it failed."""
        if summary is not None:
            for key, value in summary_scalars(summary).items():
                self.run.summary[key] = value
        self.run.finish(exit_code=0 if summary is not None else 1)


def mlflow_client(uri: str) -> Any:
    """An ``MlflowClient`` on ``uri``; a ``file:`` store is allowed explicitly (MLflow 3 keeps
    it in maintenance mode and asks for this opt-in; it needs no database package)."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created when missing (tolerating a concurrent creator)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # created by another process in between
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def file_uri(path: Path) -> str:
    """``file:`` URI of a folder (MLflow's local file store)."""
    return path.resolve().as_uri()


class MlflowTracker:
    """An MLflow run: params = the config, metrics per round (step = round), the summary as
    ``summary.<key>`` metrics; nested under ``tracking.mlflow_parent_run`` when a sweep set it."""

    name = "mlflow"

    def __init__(
        self, config: Config, *, uri: str, run_name: str, group: str, resume_id: str | None
    ) -> None:
        from mlflow.entities import Param

        tracking = config.tracking
        self.uri = uri
        self.client = mlflow_client(uri)
        if resume_id:
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
            return
        tags = {"mlflow.runName": run_name} if run_name else {}
        if tracking.mlflow_parent_run:
            tags["mlflow.parentRunId"] = tracking.mlflow_parent_run
        if group:
            tags["group"] = group
        experiment = mlflow_experiment(self.client, tracking.project)
        run = self.client.create_run(experiment, tags=tags, run_name=run_name or None)
        self.run_id = str(run.info.run_id)
        params = [Param(key, str(value)[:6000]) for key, value in flat_config(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None:
        """One metric per scalar at ``step``."""
        self._metrics(scalars, step)

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        """The summary metrics; the run marked FINISHED (FAILED when it did not finish)."""
        if summary is not None:
            scalars = {f"summary.{k}": v for k, v in summary_scalars(summary).items()}
            self._metrics(scalars, int(summary.get("rounds", 0) or 0))
        self.client.set_terminated(self.run_id, "FINISHED" if summary is not None else "FAILED")

    def _metrics(self, scalars: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])


class GuardedTracker:
    """A tracker whose failures become one warning: the first error switches it off and the
    run goes on without it."""

    def __init__(self, tracker: Tracker, say: Log) -> None:
        self.tracker = tracker
        self.name = tracker.name
        self.say = say
        self.broken = False

    def _guard(self, what: str, call: Callable[[], None]) -> None:
        if self.broken:
            return
        try:
            call()
        except Exception as error:  # tracking never kills a run
            self.broken = True
            text = " ".join(str(error).split())[:200] or type(error).__name__
            self.say(
                f"warning: {self.name} tracking failed while {what} ({text}); the run goes on "
                "without it."
            )

    def log_round(self, step: int, scalars: Mapping[str, float]) -> None:
        """The tracker's ``log_round``, guarded."""
        self._guard(f"logging round {step}", lambda: self.tracker.log_round(step, scalars))

    def finish(self, summary: Mapping[str, Any] | None) -> None:
        """The tracker's ``finish``, guarded."""
        self._guard("finishing", lambda: self.tracker.finish(summary))


# ----------------------------------------------------------------------------- the three calls


def make_trackers(
    config: Config,
    out_dir: Path | None,
    *,
    run_name: str | None = None,
    group: str | None = None,
    say: Log = lambda _message: None,
    resume: bool = False,
) -> list[Tracker]:
    """The trackers ``config.tracking`` asks for, started; each guarded (see
    :class:`GuardedTracker`). Empty when tracking is off.

    Args:
        config: The run's resolved config.
        out_dir: The run folder (TensorBoard's events, W&B's offline files, the default MLflow
            store and ``tracking.json`` go there); None when the run writes nothing.
        run_name: The name in the trackers (default: ``tracking.run_name``, else the folder's).
        group: W&B group / MLflow tag (default: ``tracking.group``).
        say: Receives the warnings.
        resume: Continue the tracker runs recorded in ``<out_dir>/tracking.json``.

    Raises:
        ConfigError: A backend needs a run folder and there is none, or its package is missing.
    """
    backends = parse_backends(config.tracking.backends)
    if not backends:
        return []
    check_tracking(config)
    tracking = config.tracking
    name = run_name or tracking.run_name or (out_dir.name if out_dir is not None else "")
    group = group if group is not None else tracking.group
    state = _read_state(out_dir) if resume and out_dir is not None else {}
    trackers: list[Tracker] = []
    for backend in backends:
        if out_dir is None and (
            backend == "tensorboard" or (backend == "mlflow" and not tracking.mlflow_uri)
        ):
            raise ConfigError(
                f"tracking with {backend} writes into the run folder; give the run an output "
                "folder (out=...)"
                + (" or set tracking.mlflow_uri." if backend == "mlflow" else ".")
            )

        def start(backend: str = backend) -> Tracker:
            if backend == "tensorboard":
                assert out_dir is not None
                return TensorBoardTracker(out_dir / "tensorboard", config)
            if backend == "wandb":
                previous = state.get("wandb")
                return WandbTracker(
                    config,
                    folder=out_dir,
                    run_name=name,
                    group=group or "",
                    resume_id=previous if isinstance(previous, str) else None,
                )
            uri = tracking.mlflow_uri or file_uri(out_dir / "mlruns")  # type: ignore[operator]
            previous = state.get("mlflow")
            resume_id = (
                previous.get("run_id")
                if isinstance(previous, Mapping) and previous.get("uri") == uri
                else None
            )
            return MlflowTracker(
                config, uri=uri, run_name=name, group=group or "", resume_id=resume_id
            )

        try:
            tracker = start()
        except ConfigError:
            raise
        except Exception as error:  # a tracker that cannot start is left out
            text = " ".join(str(error).split())[:200] or type(error).__name__
            say(
                f"warning: {backend} tracking could not start ({text}); the run goes on without it."
            )
            continue
        trackers.append(GuardedTracker(tracker, say))
    if out_dir is not None:
        _write_state(out_dir, trackers)
    return trackers


def tracker_callbacks(
    trackers: Sequence[Tracker],
    *,
    view: Callable[[Mapping[str, Any]], Mapping[str, Any]] = dict,
) -> list[Callback]:
    """Round callbacks sending each round's scalars to the trackers (empty without trackers).

    Append them after the kNN monitor, so that its accuracy is in the record they see.

    Args:
        trackers: The run's trackers.
        view: What of a record may leave the server (a DP run publishes only part of it,
            :func:`fedssd.federation.privacy.release_view`).
    """
    if not trackers:
        return []

    def report(record: dict[str, Any], _model: nn.Module) -> None:
        step = int(record["round"])
        scalars = round_scalars(view(record))
        for tracker in trackers:
            tracker.log_round(step, scalars)

    return [report]


def finish_trackers(trackers: Iterable[Tracker], summary: Mapping[str, Any] | None) -> None:
    """Send the final summary (None: the run failed or was interrupted) and close them."""
    for tracker in trackers:
        tracker.finish(summary)


def _read_state(out_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((out_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(out_dir: Path, trackers: Sequence[Tracker]) -> None:
    state: dict[str, Any] = {}
    for tracker in trackers:
        inner = tracker.tracker if isinstance(tracker, GuardedTracker) else tracker
        if isinstance(inner, WandbTracker):
            state["wandb"] = inner.id
        elif isinstance(inner, MlflowTracker):
            state["mlflow"] = {"uri": inner.uri, "run_id": inner.run_id}
    if state:
        write_json(out_dir / STATE_FILE, state)


# ----------------------------------------------------------------------------- sweeps


def sweep_tracking(title: str, out: Path, runs: Sequence[tuple[Config, str]]) -> list[Config]:
    """The runs' configs with their tracking grouped under the sweep: W&B group and MLflow
    parent run (one per sweep folder, created once and recorded in ``<out>/tracking.json``;
    the runs share the store ``<out>/mlruns`` unless ``tracking.mlflow_uri`` says otherwise).

    Args:
        title: The sweep's title (the MLflow parent run's name).
        out: The sweep folder.
        runs: Each run's config and its name in the trackers (unless its config names one).

    Runs without tracking keep their config unchanged.
    """
    configs: list[Config] = []
    parents: dict[str, str] = {}
    state = _read_state(out)
    for config, run_name in runs:
        tracking = config.tracking
        backends = parse_backends(tracking.backends)
        if not backends:
            configs.append(config)
            continue
        changes: dict[str, Any] = {
            "group": tracking.group or out.name,
            "run_name": tracking.run_name or run_name,
        }
        if "mlflow" in backends:
            uri = tracking.mlflow_uri or file_uri(out / "mlruns")
            if uri not in parents:
                parents[uri] = _mlflow_parent(uri, tracking.project, title, out, state)
            changes["mlflow_uri"] = uri
            changes["mlflow_parent_run"] = parents[uri]
        configs.append(
            dataclasses.replace(config, tracking=dataclasses.replace(tracking, **changes))
        )
    if parents:
        state["mlflow_parents"] = parents
        write_json(out / STATE_FILE, state)
    return configs


def _mlflow_parent(uri: str, project: str, title: str, out: Path, state: Mapping[str, Any]) -> str:
    """The sweep's MLflow parent run on ``uri``: the one recorded earlier, else a new one."""
    client = mlflow_client(uri)
    known = state.get("mlflow_parents")
    if isinstance(known, Mapping) and isinstance(known.get(uri), str):
        return str(known[uri])
    experiment = mlflow_experiment(client, project)
    run = client.create_run(
        experiment, tags={"mlflow.runName": title, "sweep": str(out)}, run_name=title
    )
    return str(run.info.run_id)
