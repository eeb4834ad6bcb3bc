"""The ``fedssd`` command line: a thin layer over :func:`fedssd.api.train`.

Every error a user can cause ends with one sentence on standard error and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from fedssd.errors import ConfigError, FedSSDError, TrainingDiverged
from fedssd.experiments.tables import format_table
from fedssd.version import __version__

if TYPE_CHECKING:
    from fedssd.experiments.executors import Executor
    from fedssd.experiments.grid import Log
    from fedssd.experiments.plan import PlannedRun

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE.value
"""A reader that closed the pipe early (``fedssd methods | head -2``): the shell's SIGPIPE code."""

CONFIG_HELP = (
    "Config keys: seed, device, precision, threads, and the tables [data], [model], [method], "
    "[federation], [evaluation]; the README's Configuration table lists them, and "
    "src/fedssd/config.py documents every key. Method options: docs/methods.md."
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"fedssd: error: {message} (see '{self.prog} --help').\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = _Parser(
        prog="fedssd",
        description=(
            "Federated unsupervised representation learning: SSD (Soft Separation and "
            "Distillation, ICCV 2025) and its baselines, simulated in one process. "
            "Start with `fedssd configs` (the shipped presets) and "
            "`fedssd train --config demo`."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fedssd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add_run_options(sub: argparse.ArgumentParser, *, config_required: bool = True) -> None:
        sub.add_argument(
            "--config",
            required=config_required,
            type=Path,
            metavar="FILE",
            help="TOML experiment file, or a preset's name (demo, ssd-silo, "
            "paper/cifar10-silo-ssd; `fedssd configs` lists them); keys left out take their "
            "defaults",
        )
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. --set federation.rounds=5 (repeatable)",
        )
        sub.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the files of an earlier run in the output folder",
        )
        add_threads_option(sub)
        sub.add_argument("--quiet", action="store_true", help="print no progress lines")
        sub.add_argument(
            "--verbose", action="store_true", help="also print a line after each client's training"
        )
        sub.add_argument(
            "--track",
            metavar="BACKENDS",
            help="log to tensorboard, wandb and/or mlflow (comma-separated; docs/tracking.md)",
        )

    train = commands.add_parser(
        "train",
        help="run one configured experiment",
        description=(
            "Train one federated experiment and evaluate the final global model. Writes "
            "config.toml (resolved), metrics.jsonl (one line per round), partition.json, "
            "summary.json (final evaluation), model.safetensors and checkpoints/ into the output "
            "folder. With --resume DIR, continue an interrupted run from its newest checkpoint; "
            "add --rounds N to extend a run to N rounds."
        ),
    )
    add_run_options(train, config_required=False)
    train.epilog = CONFIG_HELP
    train.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder (default: runs/<config name>-<method>-<date-time>)",
    )
    train.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the interrupted run in DIR from its newest checkpoint (its config.toml)",
    )
    train.add_argument(
        "--rounds",
        type=int,
        metavar="N",
        help="with --resume: continue the run (finished or not) to N rounds in all, ending as a "
        "run of N rounds from the start would (constant learning rate only)",
    )

    compare = commands.add_parser(
        "compare",
        help="run the same experiment with several methods and print a table",
        description=(
            "Run one experiment per method (same data, split, seed and initial weights) into "
            "DIR/<method>/, print their final evaluations side by side and write them to "
            "DIR/table.md and DIR/results.csv ('fedssd report DIR' draws the figures)."
        ),
    )
    add_run_options(compare)
    compare.epilog = CONFIG_HELP
    compare.add_argument(
        "--methods",
        nargs="+",
        default=["ssd", "fedalignuniform"],
        metavar="NAME",
        help="methods to compare (default: ssd fedalignuniform)",
    )
    compare.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="output folder (default: runs/<config name>-compare-<date-time>)",
    )

    data = commands.add_parser(
        "data",
        help="find a dataset locally, or download and verify it",
        description=(
            "Report where a dataset's verified files are. Looks in --path, then --root (or "
            "$FEDSSD_DATA), then Debian's dataset-fashion-mnist location; with --download, "
            "fetches the official files and checks their checksums. Exit 2 if not available."
        ),
    )
    data.add_argument("name", help="fashion_mnist, mnist, cifar10, cifar100 or tiny_imagenet")
    data.add_argument("--path", type=Path, help="a file or folder holding a local copy")
    data.add_argument(
        "--root", type=Path, help="data root (default: $FEDSSD_DATA or ~/.cache/fedssd)"
    )
    data.add_argument("--download", action="store_true", help="download when no copy is found")

    commands.add_parser(
        "methods", help="list the registered methods", description="List the registered methods."
    )
    configs = commands.add_parser(
        "configs",
        help="list the shipped presets, grids and split files, or print one",
        description=(
            "List the presets (for --config), sweep grids (for `fedssd sweep`) and the paper's "
            "split files (for data.split_file) shipped with fedssd, one line each; with NAME, "
            "print that file, to copy and edit it. A path on disk always wins over a name."
        ),
    )
    configs.add_argument("name", nargs="?", help="a preset, grid (grids/NAME) or split file")
    app = commands.add_parser(
        "flower-app",
        help="write the Flower App (pyproject.toml, fedssd.toml) into a folder",
        description=(
            "Write fedssd's Flower App into DIR, for `flwr run DIR` (docs/flower.md): "
            "pyproject.toml names the ServerApp and ClientApp of the installed package, "
            "fedssd.toml is the experiment."
        ),
    )
    app.add_argument("folder", type=Path, metavar="DIR", help="the folder to write")
    app.add_argument("--overwrite", action="store_true", help="replace the files already there")
    add_eval_parser(commands)
    add_export_parser(commands)
    add_sweep_parser(commands)
    add_report_parser(commands)
    add_audit_parser(commands)
    return parser


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the config's ``threads`` (CPU threads; 0 = PyTorch's default)."""
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads of PyTorch (the config key threads; 0 = PyTorch's default of one per "
        "core); 1 may be faster when other jobs share the cores",
    )


class Stopped(KeyboardInterrupt):
    """A stop by a signal: SIGTERM turned into an exception, so that the run stops as it does on
    Ctrl-C (files are written atomically, so nothing is left half-written), or either signal on
    its way out of a :func:`resumable` command, with how that command continues.

    Attributes:
        signum: The signal.
        hints: Run folders (the resume command of each is worked out when the message is
            printed, from the checkpoints there by then) or lines of text.
    """

    def __init__(self, signum: int, hints: tuple[Path | str, ...] = ()) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.hints = hints


@contextlib.contextmanager
def resumable(*hints: Path | str) -> Iterator[None]:
    """Say how the command run inside continues if it is interrupted: run folders (the resume
    command of each is printed) or lines of text. An inner :func:`resumable` says it first."""
    try:
        yield
    except Stopped as stop:
        if stop.hints:
            raise
        raise Stopped(stop.signum, hints) from None
    except KeyboardInterrupt:
        raise Stopped(signal.SIGINT.value, hints) from None


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Raise :class:`Stopped` in the main thread on SIGTERM (a cluster's preemption)."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise Stopped(signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals to the caller
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedssd`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        with _stop_on_sigterm():
            code = _dispatch(args)
            # Output still in the buffer is written here, where a closed pipe can be handled.
            sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`fedssd methods | head -2`): not an error of fedssd. Point
        # standard output at /dev/null so that the interpreter's last flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except FedSSDError as error:
        print(f"fedssd: error: {_sentence(error)}", file=sys.stderr)
        return EXIT_FAILED if isinstance(error, TrainingDiverged) else EXIT_USAGE
    except KeyboardInterrupt as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT.value
        name = signal.Signals(signum).name
        print(f"fedssd: stopped by {name}; files written so far are kept.", file=sys.stderr)
        for item in stop.hints if isinstance(stop, Stopped) else ():
            line = resume_hint(item) if isinstance(item, Path) else item
            print(f"fedssd: {line}", file=sys.stderr)
        return 128 + signum


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "data":
        return _data(args)
    if args.command == "eval":
        return run_eval(args)
    if args.command == "sweep":
        return run_sweep(args)
    if args.command == "export":
        return run_export(args)
    if args.command == "report":
        return run_report(args)
    if args.command == "privacy-audit":
        return run_privacy_audit(args)
    if args.command == "configs":
        return _configs(args.name)
    if args.command == "flower-app":
        return _flower_app(args.folder, overwrite=args.overwrite)
    return _methods()


def _configs(name: str | None) -> int:
    """List the packaged files, one line each, or print the one called ``name``."""
    from fedssd import presets

    entries = presets.entries()
    if name is None:
        width = max(len(e.name) for e in entries)
        titles = {"preset": "Presets", "grid": "Grids", "split": "Split files"}
        hints = {
            "preset": "fedssd train --config NAME",
            "grid": "fedssd sweep NAME",
            "split": "--set data.partition=file --set data.split_file=NAME",
        }
        for kind, title in titles.items():
            print(f"{title} ({hints[kind]}):")
            for entry in (e for e in entries if e.kind == kind):
                print(f"  {entry.name.ljust(width)}  {entry.description}".rstrip())
        return 0
    lookup = {e.name: e for e in entries}
    lookup.update({f"grids/{e.name}": e for e in entries if e.kind == "grid"})
    chosen = lookup.get(name.removesuffix(".toml"), lookup.get(name))
    if chosen is None:
        raise ConfigError(
            f"{name!r} is not a shipped preset, grid or split file; see `fedssd configs`."
        )
    sys.stdout.write(chosen.path.read_text(encoding="utf-8"))
    return 0


def _flower_app(folder: Path, *, overwrite: bool) -> int:
    from fedssd import presets

    for path in presets.write_flower_app(folder, overwrite=overwrite):
        print(path)
    print(f"run it with: flwr run {folder} (docs/flower.md)")
    return 0


def resume_hint(run_dir: Path) -> str:
    """How to continue an interrupted run: the command and the checkpoint it will start from."""
    from fedssd.runs.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return f"{run_dir} has no checkpoint yet; start it again with --out {run_dir} --overwrite."
    newest = checkpoints[-1].name
    rounds = int(newest.rpartition("-")[2])
    return (
        f"continue with: fedssd train --resume {run_dir} "
        f"(from checkpoint {newest}, after round {rounds})"
    )


def _train(args: argparse.Namespace) -> int:
    from fedssd.api import resume, stderr_log, train
    from fedssd.runs.resolve import load_config

    log = None if args.quiet else stderr_log
    if args.resume is not None and args.track:
        raise ConfigError(
            "--resume reports to the trackers the run's own config.toml names; drop --track."
        )
    args.overrides = _with_tracking(args)
    if args.resume is not None:
        if args.config is not None or args.overrides or args.out is not None or args.overwrite:
            raise ConfigError(
                "--resume continues a run with its own config.toml and folder; "
                "drop --config, --set, --out and --overwrite."
            )
        with resumable(args.resume):
            result = resume(
                args.resume, rounds=args.rounds, threads=args.threads, log=log, verbose=args.verbose
            )
    elif args.config is None:
        raise ConfigError("train needs --config FILE (or --resume DIR to continue a run).")
    elif args.rounds is not None:
        raise ConfigError(
            "--rounds extends a run with --resume DIR; for a new run, "
            "--set federation.rounds=N sets its rounds."
        )
    else:
        config = load_config(args.config, overrides=_with_threads(args))
        out = args.out or _default_out(args.config, config.method.name)
        with resumable(out):
            result = train(config, out=out, overwrite=args.overwrite, log=log, verbose=args.verbose)
    print(format_table({result.config.method.name: result.summary}))
    print(f"\nrun written to {result.out_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedssd.api import stderr_log, train
    from fedssd.config import MethodConfig
    from fedssd.methods import shared_options
    from fedssd.runs.outputs import check_run_dir
    from fedssd.runs.resolve import load_config, resolve

    args.overrides = _with_tracking(args)
    base = load_config(args.config, overrides=_with_threads(args))
    out = args.out or _default_out(args.config, "compare")
    # The comparison's runs are grouped in the trackers (W&B group, MLflow tag).
    tracking = dataclasses.replace(base.tracking, group=base.tracking.group or out.name)
    base = dataclasses.replace(base, tracking=tracking)
    configs = {
        name: resolve(
            dataclasses.replace(
                base,
                method=MethodConfig(name=name, options=shared_options(name, base.method.options)),
            )
        )
        for name in dict.fromkeys(args.methods)
    }
    for name in configs:
        check_run_dir(out / name, overwrite=args.overwrite)
    log = None if args.quiet else stderr_log
    summaries: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for name, config in configs.items():
        with resumable(
            out / name,
            "compare itself has no resume: the same compare command with --overwrite runs "
            "every method again.",
        ):
            result = train(
                config, out=out / name, overwrite=args.overwrite, log=log, verbose=args.verbose
            )
        summaries[name] = result.summary
    write_compare_tables(out, summaries)
    print(format_table(summaries))
    print(
        f"\n{len(summaries)} runs in {time.perf_counter() - started:.0f}s, written to {out}/ "
        "(with table.md and results.csv)"
    )
    return 0


def _with_threads(args: argparse.Namespace) -> list[str]:
    """The command's overrides, with ``--threads N`` as ``threads=N`` (after ``--set``)."""
    overrides = list(args.overrides)
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    return overrides


def write_compare_tables(out: Path, summaries: dict[str, dict[str, Any]]) -> None:
    """``table.md`` (the printed table) and ``results.csv`` (every scalar of each summary, one
    line per method) in a compare folder."""
    from fedssd.runs.outputs import write_text_atomic

    write_text_atomic(out / "table.md", format_table(summaries) + "\n")
    fields = ["method"]
    rows = []
    for name, summary in summaries.items():
        row: dict[str, Any] = {"method": name}
        for key, value in summary.items():
            if key != "method" and (value is None or isinstance(value, int | float | str)):
                row[key] = "" if value is None else value
                if key not in fields:
                    fields.append(key)
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buffer.getvalue())


def _data(args: argparse.Namespace) -> int:
    from fedssd.api import stderr_log
    from fedssd.data.datasets import DATASET_NAMES, USER_DATASETS, fetch_dataset, locate_dataset

    if args.name not in DATASET_NAMES or args.name in USER_DATASETS:
        names = ", ".join(n for n in DATASET_NAMES if n not in USER_DATASETS)
        raise ConfigError(f"unknown dataset {args.name!r}; choose one of: {names}.")
    found = locate_dataset(args.name, path=args.path, root=args.root)
    if found is None and args.download:
        found = fetch_dataset(args.name, root=args.root, log=stderr_log)
    if found is None:
        print(
            f"fedssd: {args.name} was not found locally; pass --download to fetch it "
            "(or see 'fedssd data --help').",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(found)
    return 0


def _methods() -> int:
    from fedssd.methods import METHODS

    width = max(len(name) for name in METHODS)
    for name, spec in METHODS.items():
        print(f"{name:<{width}}  {spec.summary}")
    return 0


def _with_tracking(args: argparse.Namespace) -> list[str]:
    """The overrides with ``--track`` turned into ``tracking.backends``."""
    overrides = list(args.overrides)
    if getattr(args, "track", None):
        overrides.append(f"tracking.backends={args.track!r}")
    return overrides


def _default_out(config_path: Path, label: str) -> Path:
    return Path("runs") / f"{config_path.stem}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"


def _sentence(error: BaseException) -> str:
    """The error's message as one line."""
    return " ".join(str(error).split()) or type(error).__name__


# ----------------------------------------------------------------------------- fedssd eval


def add_eval_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an argparse sub-parsers object and return its parser."""
    from fedssd.data.datasets import DATASET_NAMES
    from fedssd.experiments.evaluate import LABEL_FRACTIONS, PROTOCOLS

    parser: argparse.ArgumentParser = commands.add_parser(
        "eval",
        help="re-evaluate a finished run (kNN, linear probe, semi-supervised fine-tuning)",
        description=(
            "Load a run folder's config.toml and model.safetensors and evaluate the model with "
            "one of the paper's protocols, on the run's data or (with --eval-data) on another "
            "dataset. The result is written to "
            "DIR/eval/<protocol>[-<labels>][-<N>ep][-on-<data>[-<npz file stem>]].json "
            "(-<N>ep when --epochs is not the default; docs/evaluation.md)."
        ),
    )
    parser.add_argument("--run", required=True, type=Path, metavar="DIR", help="a run folder")
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS, help="which evaluation")
    parser.add_argument(
        "--labels",
        type=float,
        choices=LABEL_FRACTIONS,
        help="labelled fraction for finetune: 0.01 or 0.1 (the paper's 1%% and 10%%)",
    )
    parser.add_argument(
        "--eval-data",
        metavar="NAME",
        help="evaluate on another dataset (transfer): " + ", ".join(DATASET_NAMES),
    )
    parser.add_argument(
        "--eval-path", type=Path, metavar="PATH", help="file or folder holding --eval-data"
    )
    parser.add_argument(
        "--epochs",
        type=int,
        metavar="N",
        help="linear-probe or fine-tuning epochs (default: the run's probe epochs; 200)",
    )
    parser.add_argument(
        "--device", metavar="NAME", help="auto, cpu, cuda or cuda:N (default: the run's device)"
    )
    parser.add_argument(
        "--threads",
        type=_threads_arg,
        metavar="N",
        help="CPU threads (default: the run's threads setting; 0 = PyTorch's default)",
    )
    parser.add_argument("--quiet", action="store_true", help="print no progress lines")
    return parser


def _threads_arg(text: str) -> int:
    """``--threads``: a non-negative integer."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--threads must be a non-negative integer, not {text!r}")
    return value


def run_eval(args: argparse.Namespace) -> int:
    from fedssd.api import stderr_log
    from fedssd.experiments.evaluate import evaluate_run, format_result

    """Run ``fedssd eval``: print the headline numbers and where the result went.

    Raises:
        fedssd.errors.FedSSDError: As :func:`evaluate_run`; the CLI prints it and exits 2.
    """
    result = evaluate_run(
        args.run,
        args.protocol,
        labels=args.labels,
        eval_data=args.eval_data,
        eval_path=None if args.eval_path is None else str(args.eval_path),
        epochs=args.epochs,
        device=args.device,
        threads=args.threads,
        log=None if args.quiet else stderr_log,
    )
    print(format_result(result))
    # The progress line saying where the result went is on standard error; this is the one on
    # standard output (with --quiet, the only one).
    if args.quiet:
        print(f"\nresult written to {Path(args.run) / 'eval' / result['file']}")
    return 0


# ----------------------------------------------------------------------------- fedssd sweep


def add_sweep_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``fedssd sweep`` to the CLI's sub-command action."""
    sweep: argparse.ArgumentParser = commands.add_parser(
        "sweep",
        help="run a grid of settings x methods x seeds and tabulate it",
        description=(
            "Run every (setting, row, seed) of a grid file one after another into "
            "DIR/<setting>/<row>/seed-<s>/, skipping finished runs and resuming interrupted "
            "ones from their newest checkpoint, then write DIR/results.csv (one line per run) "
            "and DIR/table.md (mean ± std over seeds, best per column in bold, paired "
            "differences versus the baseline row). "
            "Every config is checked before the first run starts. Format: docs/sweeps.md."
        ),
    )
    sweep.add_argument(
        "grid",
        type=Path,
        metavar="GRID",
        help="the grid file, or a packaged grid's name (paper-main; `fedssd configs` lists them)",
    )
    sweep.add_argument(
        "--out", type=Path, metavar="DIR", help="sweep folder (default: runs/<grid name>)"
    )
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every run, e.g. --set device=cuda (repeatable)",
    )
    add_threads_option(sweep)
    sweep.add_argument(
        "--dry-run",
        action="store_true",
        help="check the grid and its configs and list its runs; run nothing and read no data "
        "(so splits are not checked and nothing is downloaded)",
    )
    sweep.add_argument(
        "--tables-only",
        action="store_true",
        help="rewrite results.csv and table.md from the finished runs; run nothing",
    )
    sweep.add_argument(
        "--quiet", action="store_true", help="print only the sweep's lines, not each run's"
    )
    add_execution_options(sweep)
    return sweep


def add_execution_options(sweep: argparse.ArgumentParser) -> None:
    """The options saying where and how many runs execute at once (docs/sweeps.md)."""
    group = sweep.add_argument_group("execution (docs/sweeps.md)")
    group.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="runs at once: N local worker processes, each with cores // N torch threads "
        "(default 1: one after another in this process)",
    )
    group.add_argument(
        "--devices",
        metavar="cuda:0,cuda:1",
        help="GPUs for the local workers, one each (with device = auto or cuda in the config)",
    )
    group.add_argument(
        "--executor",
        default="local",
        choices=("local", "submitit", "ray"),
        help="local processes (default), Slurm through submitit, or Ray",
    )
    group.add_argument(
        "--cluster",
        default=None,
        metavar="NAME",
        help="submitit's cluster: slurm, or local (runs the jobs as local processes)",
    )
    group.add_argument(
        "--executor-param",
        dest="executor_params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a submitit parameter, e.g. timeout_min=600, slurm_partition=gpu, gpus_per_node=1",
    )
    group.add_argument(
        "--ray-address", metavar="ADDRESS", help="Ray cluster to join (default: a local one)"
    )
    group.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="only the grid's first N runs (in the order setting, row, seed)",
    )
    group.add_argument(
        "--track",
        metavar="BACKENDS",
        help="log every run to tensorboard, wandb and/or mlflow (comma-separated; "
        "docs/tracking.md); the runs are grouped under the sweep",
    )


def run_sweep(args: argparse.Namespace) -> int:
    """``fedssd sweep``: returns the exit code (user errors raise ConfigError)."""
    from fedssd.api import stderr_log
    from fedssd.experiments.execute import execute
    from fedssd.experiments.grid import FAILED_FILE, load_grid
    from fedssd.experiments.plan import check_partitions, plan, run_status
    from fedssd.experiments.tables import write_outputs

    overrides = list(args.overrides)
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    if getattr(args, "track", None):
        overrides.append(f"tracking.backends={args.track!r}")
    grid = load_grid(args.grid, overrides)
    out: Path = args.out or Path("runs") / grid.path.stem
    runs = plan(grid, out)
    limit = getattr(args, "limit", None)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be at least 1, not {limit}.")
        runs = runs[:limit]
    if args.dry_run:
        for index, run in enumerate(runs, start=1):
            status = run_status(run, grid.columns)
            print(f"{index:>4}/{len(runs)}  {status:<8}  {run.run_dir}")
        todo = sum(1 for run in runs if run_status(run, grid.columns) != "done")
        print(
            f"{len(runs)} runs checked; {todo} to do. A dry run reads no data: the data and its "
            "splits are checked when the sweep starts."
        )
        return 0
    if not args.tables_only:
        check_partitions(runs, f"grid {grid.path.name}")
    if args.tables_only:
        if not out.is_dir():
            raise ConfigError(f"sweep folder {out} does not exist; run the sweep first.")
        write_outputs(grid, out, runs)
    else:
        with resumable(
            f"continue with: fedssd sweep {args.grid} --out {out} (finished runs are kept; an "
            "interrupted run goes on from its newest checkpoint)"
        ):
            run_log = None if args.quiet else stderr_log
            executor = _executor(args, out, runs, run_log)
            execute(grid, out, runs, log=stderr_log, run_log=run_log, executor=executor)
    sys.stdout.write((out / "table.md").read_text(encoding="utf-8"))
    print(f"\nresults.csv and table.md written to {out}/")
    if (out / FAILED_FILE).is_file() and not args.tables_only:
        failed = json.loads((out / FAILED_FILE).read_text(encoding="utf-8"))
        print(
            f"fedssd: {len(failed)} runs failed, the others finished; see {out}/{FAILED_FILE}.",
            file=sys.stderr,
        )
        return 1
    return 0


def _executor(
    args: argparse.Namespace, out: Path, runs: Sequence[PlannedRun], run_log: Log | None
) -> Executor:
    """The executor the command line asks for (checked before any run starts)."""
    from fedssd import config as config_module
    from fedssd.experiments.executors import make_executor, parse_devices

    devices = parse_devices(getattr(args, "devices", None))
    if devices:
        pinned = sorted({r.config.device for r in runs} - {"auto", "cuda"})
        if pinned:
            raise ConfigError(
                f"--devices spreads runs over GPUs, but the config sets device = {pinned[0]!r}; "
                "set device = auto (or cuda) so that each worker uses its own GPU."
            )
    parameters: dict[str, Any] = {}
    for item in getattr(args, "executor_params", []):
        key, value = config_module.parse_override(item)
        parameters[key] = value
    return make_executor(
        getattr(args, "executor", "local"),
        jobs=getattr(args, "jobs", 1),
        devices=devices,
        run_log=run_log,
        folder=out / ".submitit",
        cluster=getattr(args, "cluster", None),
        parameters=parameters,
        address=getattr(args, "ray_address", None),
    )


# ----------------------------------------------------------------------------- fedssd report


def add_report_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``fedssd report`` to the CLI's sub-command action."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "report",
        help="draw the figures of a run or a sweep and write report.md",
        description=(
            "Write PNG figures into DIR/figures/ and DIR/report.md embedding them: per-round "
            "curves with a band over seeds, each setting's client label histogram, the "
            "inter-client uniformity heatmaps and a map of the embeddings on the sphere "
            "coloured by client and by class. Needs matplotlib (pip install 'fedssd[report]')."
        ),
    )
    parser.add_argument("folder", type=Path, metavar="DIR", help="a run folder or a sweep folder")
    parser.add_argument(
        "--samples",
        type=int,
        default=2000,
        metavar="N",
        help="training images embedded for each sphere map (default 2000)",
    )
    parser.add_argument(
        "--no-embeddings",
        action="store_true",
        help="skip the sphere maps (they load each model and its data)",
    )
    parser.add_argument("--quiet", action="store_true", help="print no progress lines")
    return parser


def run_report(args: argparse.Namespace) -> int:
    """``fedssd report``: returns the exit code (user errors raise FedSSDError)."""
    from fedssd.api import stderr_log
    from fedssd.experiments.report import build_report

    if args.samples < 3:
        raise ConfigError(f"--samples must be at least 3, not {args.samples}.")
    report = build_report(
        args.folder,
        embedding_samples=args.samples,
        embeddings=not args.no_embeddings,
        log=None if args.quiet else stderr_log,
    )
    print(f"report written to {report}")
    return 0


# ----------------------------------------------------------------------------- fedssd export


def add_export_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``fedssd export`` to the CLI's sub-command action."""
    from fedssd.encoders import FORMATS

    export: argparse.ArgumentParser = commands.add_parser(
        "export",
        help="write a run's trained encoder as safetensors, TorchScript or ONNX",
        description=(
            "Write the trained encoder of a finished run (with --projector, encoder and "
            "projector) as safetensors, TorchScript or ONNX, with a JSON card next to it "
            "(input size, channels, value range, feature width, method, data, the run's "
            "summary). TorchScript and ONNX files are checked to give the run's features. "
            "docs/export.md shows how to use them."
        ),
    )
    export.add_argument("run", type=Path, metavar="RUN", help="a finished run folder")
    export.add_argument(
        "--format", dest="fmt", choices=FORMATS, default="safetensors", help="file format"
    )
    export.add_argument("--projector", action="store_true", help="include the projector")
    export.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="model file (default: RUN/export/encoder.<suffix>); the card is FILE with .json",
    )
    return export


def run_export(args: argparse.Namespace) -> int:
    """``fedssd export``: returns the exit code (user errors raise FedSSDError)."""
    from fedssd.encoders import export_encoder

    target, card = export_encoder(args.run, args.fmt, projector=args.projector, out=args.out)
    print(f"{args.fmt} written to {target}; card {card}")
    return 0


# ----------------------------------------------------------------------------- fedssd privacy-audit


def add_audit_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``fedssd privacy-audit`` to the CLI's sub-command action."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "privacy-audit",
        help="bound a DP config's epsilon from below with one training run and canary clients",
        description=(
            "Train the configured DP federation once more, in memory, with canary clients "
            "beside the real ones (each in the run with probability 1/2, sending a fixed random "
            "direction at the clip norm), guess from every round's global model which canaries "
            "took part, and print the empirical lower bound on epsilon this gives (Steinke, Nasr, "
            "Jagielski 2023) beside the accountant's epsilon. Nothing is written unless --json "
            "is given. docs/privacy.md, section Auditing."
        ),
    )
    parser.add_argument(
        "source",
        metavar="RUN_OR_CONFIG",
        help="a run folder (its config.toml), a TOML experiment file or a preset's name",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set privacy.target_epsilon=4 (repeatable)",
    )
    parser.add_argument(
        "--canaries", type=int, default=1000, metavar="M", help="canary clients (default 1000)"
    )
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        metavar="P",
        help="confidence of the lower bound (default 0.95)",
    )
    parser.add_argument(
        "--audit-seed",
        type=int,
        metavar="N",
        help="seed of the canaries' coins and directions (default: a fresh one, printed)",
    )
    add_threads_option(parser)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="print no progress lines")
    return parser


def run_privacy_audit(args: argparse.Namespace) -> int:
    """``fedssd privacy-audit``: returns the exit code (user errors raise FedSSDError)."""
    from fedssd.api import stderr_log
    from fedssd.experiments.audit import privacy_audit
    from fedssd.runs.outputs import write_json

    report = privacy_audit(
        args.source,
        overrides=_with_threads(args),
        canaries=args.canaries,
        audit_seed=args.audit_seed,
        confidence=args.confidence,
        log=None if args.quiet else stderr_log,
    )
    print(
        f"empirical epsilon lower bound: {report.epsilon_lower_bound:.3f} "
        f"({report.confidence:.0%} confidence; {report.correct} of {report.guesses} guesses "
        f"right, {report.canaries} canaries, {report.included} in)"
    )
    print(
        f"accountant's epsilon:          {report.accountant_epsilon:.3f} "
        f"(delta {report.delta:g}, {report.rounds} rounds, noise multiplier "
        f"{report.noise_multiplier:.4g}, clip norm {report.clip_norm:g})"
    )
    print(f"audit seed:                    {report.audit_seed}")
    if args.json is not None:
        write_json(args.json, dataclasses.asdict(report))
        print(f"report written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
