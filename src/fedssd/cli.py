"""The ``fedssd`` command line: a thin layer over :func:`fedssd.api.train`.

Every error a user can cause ends with one sentence on standard error and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from fedssd import __version__
from fedssd.errors import ConfigError, FedSSDError, TrainingDiverged

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE.value
"""A reader that closed the pipe early (``fedssd methods | head -2``): the shell's SIGPIPE code."""

# The columns of the comparison table: (summary key, header, scale, format).
TABLE_COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    ("linear_probe_acc", "LP acc %", 100.0, "{:.2f}"),
    ("knn_acc", "kNN acc %", 100.0, "{:.2f}"),
    ("uniformity_global", "-L_unif global", 1.0, "{:.3f}"),
    ("uniformity_inter_mean", "-L_unif inter", 1.0, "{:.3f}"),
    ("uniformity_intra_mean", "-L_unif intra", 1.0, "{:.3f}"),
    ("alignment", "L_align", 1.0, "{:.3f}"),
    ("effective_rank", "eff. rank", 1.0, "{:.1f}"),
    ("uniformity_global_z", "-L_unif global (z)", 1.0, "{:.3f}"),
    ("train_seconds", "train s", 1.0, "{:.0f}"),
)


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
    from fedssd.encoders import add_export_parser
    from fedssd.protocols import add_eval_parser
    from fedssd.report import add_report_parser
    from fedssd.sweep import add_sweep_parser

    add_eval_parser(commands)
    add_export_parser(commands)
    add_sweep_parser(commands)
    add_report_parser(commands)
    return parser


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the config's ``threads`` (CPU threads; 0 = PyTorch's default)."""
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads of PyTorch (the config key threads; 0 = PyTorch's default of one per "
        "core); 1 is much faster when other jobs share the cores",
    )


class Stopped(KeyboardInterrupt):
    """A termination signal (SIGTERM) turned into an exception, so that the run stops as it does
    on Ctrl-C: files are written atomically, so nothing is left half-written."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# How an interrupted command continues: a run folder (its resume command is worked out when the
# message is printed, from the checkpoints there by then) or a command line.
_continue: list[Path | str] = []


def continue_with(*items: Path | str) -> None:
    """Say how the running command continues if it is interrupted: run folders (the resume
    command of each is printed) or lines of text."""
    _continue[:] = items


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
    _continue.clear()
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
        for item in _continue:
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
        from fedssd.protocols import run_eval

        return run_eval(args)
    if args.command == "sweep":
        from fedssd.sweep import run_sweep

        return run_sweep(args)
    if args.command == "export":
        from fedssd.encoders import run_export

        return run_export(args)
    if args.command == "report":
        from fedssd.report import run_report

        return run_report(args)
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
    from fedssd.checkpoint import list_checkpoints

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
    from fedssd.api import load_config, resume, stderr_log, train

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
        _continue[:] = [args.resume]
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
        _continue[:] = [out]
        result = train(
            config,
            out=out,
            overwrite=args.overwrite,
            log=log,
            verbose=args.verbose,
        )
    print(format_table({result.config.method.name: result.summary}))
    print(f"\nrun written to {result.out_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedssd.api import load_config, resolve, stderr_log, train
    from fedssd.config import MethodConfig
    from fedssd.methods import shared_options
    from fedssd.outputs import check_run_dir

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
        _continue[:] = [
            out / name,
            "compare itself has no resume: the same compare command with --overwrite runs "
            "every method again.",
        ]
        result = train(
            config, out=out / name, overwrite=args.overwrite, log=log, verbose=args.verbose
        )
        summaries[name] = result.summary
    _continue.clear()
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
    from fedssd.outputs import write_text_atomic

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


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """A Markdown table with one row per method and one column per headline metric."""
    columns = [c for c in TABLE_COLUMNS if any(c[0] in s for s in summaries.values())]
    header = ["method", *(c[1] for c in columns)]
    rows = [header, ["---"] * len(header)]
    for name, summary in summaries.items():
        cells = [name]
        for key, _title, scale, fmt in columns:
            value = summary.get(key)
            cells.append("n/a" if value is None else fmt.format(value * scale))
        rows.append(cells)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


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


if __name__ == "__main__":
    sys.exit(main())
