"""What a CPU learns from photos: linear probe and kNN against CPU time, per encoder and size.

Usage::

    python -m benchmarks.photos run NAME --data PATH [--rounds 10,20,40] [--out runs/photos]
        [--set KEY=VALUE ...]
    python -m benchmarks.photos table [--out runs/photos] [--figure FILE.png]

``run`` trains one configuration (the photos preset ``cifar10-photos`` with the ``--set``
overrides, ``data.path`` = ``--data``) to the first number of ``--rounds``, then extends the
same run (``fedssd.api.resume(rounds=...)``, which ends as a run of that many rounds from the
start would) to each next number, and after each step appends one line to
``<out>/NAME/points.jsonl``: the rounds, the linear-probe and kNN accuracies of the final
evaluation, and the CPU seconds of the process (``resource.getrusage``: user + system) spent in
training so far, in the final evaluation and in reading the data. The phases are told apart by
the run's own progress lines (the log hook of ``fedssd.api.train``): the first round starts after
the line ``training ...`` and the final evaluation after ``evaluating the final global model``.
CPU time is what this measures because the machine it was written for is shared: wall time
there depends on the other jobs, CPU time far less. Run it with one thread (the preset's
``threads``, or ``--set threads=1``) and at most as many runs at once as there are idle cores.

``table`` prints a Markdown table of every ``points.jsonl`` under ``--out`` (CPU minutes of a
whole run of that many rounds: training so far + one final evaluation + reading the data) and,
with ``--figure``, draws linear-probe accuracy against those CPU minutes (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedssd.api import resume, train

_TRAINING = "training "
_EVALUATING = "evaluating the final global model"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class PhaseClock:
    """CPU seconds spent before training (reading data, building the model), in rounds and in
    the final evaluation, from the progress lines of one call of ``train`` or ``resume``."""

    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.start = _cpu_seconds()
        self.rounds_start: float | None = None
        self.evaluation_start: float | None = None

    def __call__(self, message: str) -> None:
        now = _cpu_seconds()
        if message.startswith(_TRAINING) and self.rounds_start is None:
            self.rounds_start = now
        elif message.startswith(_EVALUATING):
            self.evaluation_start = now
        self.echo(message)

    def phases(self) -> dict[str, float]:
        end = _cpu_seconds()
        if self.rounds_start is None or self.evaluation_start is None:
            raise RuntimeError("the run printed no 'training' or 'evaluating' line")
        return {
            "setup": self.rounds_start - self.start,
            "training": self.evaluation_start - self.rounds_start,
            "evaluation": end - self.evaluation_start,
        }


def _point(run_dir: Path, clock: PhaseClock, wall: float, trained: float) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    phases = clock.phases()
    return {
        "rounds": summary["rounds"],
        "linear_probe_acc": summary["linear_probe_acc"],
        "knn_acc": summary["knn_acc"],
        "cpu_training_s": trained + phases["training"],
        "cpu_evaluation_s": phases["evaluation"],
        "cpu_setup_s": phases["setup"],
        "wall_s": wall,
        "threads": summary["threads"],
    }


def run(args: argparse.Namespace) -> None:
    """Train one configuration to each number of rounds in turn and record the points."""
    rounds = [int(r) for r in args.rounds.split(",")]
    folder = Path(args.out) / args.name
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = folder / "run"
    overrides = [
        f"data.path={Path(args.data).resolve()}",
        f"federation.rounds={rounds[0]}",
        *args.set,
    ]
    (folder / "command.json").write_text(
        json.dumps({"config": args.config, "overrides": overrides, "rounds": rounds}) + "\n",
        encoding="utf-8",
    )
    points = folder / "points.jsonl"
    points.unlink(missing_ok=True)
    trained = 0.0
    for index, total in enumerate(rounds):
        clock = PhaseClock(lambda line: print(f"[{args.name}] {line}", flush=True))
        started = time.perf_counter()
        if index == 0:
            train(args.config, overrides=overrides, out=run_dir, overwrite=True, log=clock)
        else:
            resume(run_dir, rounds=total, log=clock)
        point = _point(run_dir, clock, time.perf_counter() - started, trained)
        trained = point["cpu_training_s"]
        with points.open("a", encoding="utf-8") as out:
            out.write(json.dumps(point) + "\n")


def _rows(root: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for points in sorted(root.glob("*/points.jsonl")):
        for line in points.read_text(encoding="utf-8").splitlines():
            rows.append((points.parent.name, json.loads(line)))
    return rows


def _whole_run_minutes(point: dict[str, Any]) -> float:
    return (point["cpu_training_s"] + point["cpu_evaluation_s"] + point["cpu_setup_s"]) / 60


def table(args: argparse.Namespace) -> None:
    """Print the Markdown table of every recorded point; draw the figure if asked."""
    rows = _rows(Path(args.out))
    print("| configuration | rounds | LP % | kNN % | CPU min training | CPU min whole run |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, p in rows:
        trained = 0.0 if name.startswith(_UNTRAINED) else p["cpu_training_s"] / 60
        print(
            f"| {name} | {p['rounds'] if trained else 0} | {100 * p['linear_probe_acc']:.2f} | "
            f"{100 * p['knn_acc']:.2f} | {trained:.1f} | {_whole_run_minutes(p):.1f} |"
        )
    if args.figure:
        _figure(rows, Path(args.figure))


_UNTRAINED = "untrained-"


def _figure(rows: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    """Linear-probe accuracy against CPU minutes of training, one line per configuration
    ``ssd-X``, starting at the untrained encoder ``untrained-X`` (0 minutes) when recorded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    untrained = {n.removeprefix(_UNTRAINED): p for n, p in rows if n.startswith(_UNTRAINED)}
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name in sorted({n for n, _ in rows if not n.startswith(_UNTRAINED)}):
        points = [p for n, p in rows if n == name]
        start = untrained.get(name.split("-", 1)[1])
        minutes = [p["cpu_training_s"] / 60 for p in points]
        accuracy = [100 * p["linear_probe_acc"] for p in points]
        if start is not None:
            minutes.insert(0, 0.0)
            accuracy.insert(0, 100 * start["linear_probe_acc"])
        axes.plot(minutes, accuracy, marker="o", label=name)
        for x, y, p in zip(minutes[-len(points) :], accuracy[-len(points) :], points, strict=True):
            axes.annotate(str(p["rounds"]), (x, y), textcoords="offset points", xytext=(3, -10))
    axes.set_xlabel("CPU minutes of training (one thread; 0 = untrained encoder)")
    axes.set_ylabel("linear probe accuracy on the 10,000 test photos (%)")
    axes.set_title("SSD on CIFAR-10 photos, K = 10, Dir(0.1): labels are rounds", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("run", help="train one configuration and record its points")
    one.add_argument("name")
    one.add_argument("--data", required=True, help="the photos: .tar.gz, folder or .npz")
    one.add_argument("--config", default="cifar10-photos")
    one.add_argument("--rounds", default="10")
    one.add_argument("--out", default="runs/photos")
    one.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    one.set_defaults(handler=run)
    summary = commands.add_parser("table", help="tabulate the recorded points")
    summary.add_argument("--out", default="runs/photos")
    summary.add_argument("--figure", default=None)
    summary.set_defaults(handler=table)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
