"""``fedssd report DIR``: figures and a ``report.md`` for a run folder or a sweep folder.

Figures (PNG, in ``DIR/figures/``), per setting of a sweep (one setting for a single run):

- per-round curves of the loss parts, kNN accuracy and any uniformity in ``metrics.jsonl``, one
  line per method row (mean over seeds) with a min-max band over seeds;
- the partition's per-client label histogram (stacked bars, from ``partition.json``);
- the inter-client uniformity heatmaps of ``summary.json`` (h and z);
- a 2-D map of the embeddings on the sphere, coloured by client and by class.

matplotlib (the ``report`` extra) is imported on first use, with the Agg backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedssd.errors import ConfigError, DataError
from fedssd.runs.sites import format_site_table, site_table

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from fedssd.config import Config

Log = Callable[[str], None]

FIGURES = "figures"
# Colour lists up to this many categories get a legend; more get a colour bar.
LEGEND_LIMIT = 20
# Heatmaps up to this many clients carry each cell's value.
CELL_TEXT_LIMIT = 20
# A curve whose range is under this share of its magnitude is drawn with zero on its axis, so
# that a nearly constant term does not fill the panel as if it moved.
FLAT_SHARE = 0.05
# Per-round quantities drawn with the opposite sign, so that the curves use the tables' sign:
# -L_unif, higher is better.
NEGATED = {"loss_uniform": "-L_unif (uniformity loss negated; higher is more uniform)"}
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}
"""The published class names of datasets whose labels are indices (legends show them)."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """A finished (or partial) run inside the folder being reported.

    Attributes:
        setting: Its setting (the sweep's column group; ``run`` for a single run).
        row: Its row (the method row; the method's name for a single run).
        method: The method.
        seed: The run seed.
        path: The run folder.
    """

    setting: str
    row: str
    method: str
    seed: int
    path: Path


@dataclasses.dataclass(frozen=True)
class Figure_:
    """A written figure and its caption (for report.md)."""

    path: Path
    title: str
    caption: str


@dataclasses.dataclass(frozen=True)
class SphereMap:
    """Unit-norm features drawn on the sphere S^2 (see :func:`sphere_map`).

    Attributes:
        longitude: ``(n,)`` radians in [-pi, pi].
        latitude: ``(n,)`` radians in [-pi/2, pi/2].
        captured: Share of the variance of the unit-norm features in the 3 components kept.
    """

    longitude: np.ndarray
    latitude: np.ndarray
    captured: float


# ----------------------------------------------------------------------------- discovery


def find_runs(folder: Path) -> tuple[str, list[RunInfo]]:
    """What ``folder`` is (``run``, ``compare`` or ``sweep``) and the runs in it, in table order.

    Raises:
        DataError: The folder holds neither a run, nor a compare folder, nor a sweep.
    """
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass a run, compare or sweep folder.")
    if _is_run(folder):
        config = _config(folder)
        method = config.method.name
        return "run", [RunInfo("run", method, method, config.seed, folder)]
    compared = sorted(p for p in folder.iterdir() if p.is_dir() and _is_run(p))
    if compared:
        # A compare folder: DIR/<method>/ runs, in the order of its results.csv when present.
        listed = _compare_order(folder)
        compared.sort(key=lambda p: (listed.index(p.name) if p.name in listed else len(listed), p))
        members = []
        for run_dir in compared:
            config = _config(run_dir)
            members.append(
                RunInfo("compare", run_dir.name, config.method.name, config.seed, run_dir)
            )
        return "compare", members
    order = _sweep_order(folder)
    runs: list[RunInfo] = []
    for config_path in sorted(folder.glob("*/*/seed-*/config.toml")):
        run_dir = config_path.parent
        if not (run_dir / "metrics.jsonl").is_file():
            continue
        config = _config(run_dir)
        setting, row = run_dir.parent.parent.name, run_dir.parent.name
        runs.append(RunInfo(setting, row, config.method.name, config.seed, run_dir))
    if not runs:
        raise DataError(
            f"{folder} holds no run (config.toml and metrics.jsonl), no compare runs "
            "(<method>/ folders) and no sweep (<setting>/<row>/seed-<s>/ folders); pass the "
            "folder fedssd train, compare or sweep wrote."
        )
    runs.sort(key=lambda r: (*order(r), r.seed))
    return "sweep", runs


def _is_run(folder: Path) -> bool:
    return (folder / "config.toml").is_file() and (folder / "metrics.jsonl").is_file()


def _compare_order(folder: Path) -> list[str]:
    """The methods of a compare folder's results.csv, in its order (empty when absent)."""
    path = folder / "results.csv"
    if not path.is_file():
        return []
    import csv

    with path.open(encoding="utf-8", newline="") as handle:
        return [row.get("method", "") for row in csv.DictReader(handle)]


def _sweep_order(folder: Path) -> Callable[[RunInfo], tuple[int, int, str, str]]:
    """Sort key following sweep.json's setting and row order (else by name)."""
    data = _json(folder / "sweep.json") or {}
    settings: list[str] = list(data.get("settings", []))
    rows: list[str] = [r["name"] for r in data.get("rows", [])]

    def key(run: RunInfo) -> tuple[int, int, str, str]:
        s = settings.index(run.setting) if run.setting in settings else len(settings)
        r = rows.index(run.row) if run.row in rows else len(rows)
        return s, r, run.setting, run.row

    return key


def _config(run_dir: Path) -> Config:
    from fedssd import config as config_module

    return config_module.load(run_dir / "config.toml")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-round records of ``metrics.jsonl`` (a truncated last line is ignored)."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


# ----------------------------------------------------------------------------- pure helpers


def curve_keys(histories: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
    """The per-round quantities to plot, in a fixed order: ``loss``, its parts, ``knn_acc``,
    then every key naming uniformity."""
    keys: list[str] = []
    for history in histories:
        for record in history:
            keys.extend(k for k in record if k not in keys)
    numeric = [
        k
        for k in keys
        if any(
            isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool)
            for h in histories
            for r in h
        )
    ]
    ordered = ["loss"] if "loss" in numeric else []
    ordered += sorted(k for k in numeric if k.startswith("loss_"))
    ordered += ["knn_acc"] if "knn_acc" in numeric else []
    ordered += sorted(k for k in numeric if "uniformity" in k)
    return ordered


def band(
    histories: Sequence[Sequence[Mapping[str, Any]]], key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, minimum and maximum over seeds of ``key`` per round.

    Args:
        histories: One list of per-round records per seed.
        key: The quantity.

    Returns:
        ``(rounds, mean, low, high)``, each ``(r,)``: the rounds where at least one seed has the
        key, and the statistics over the seeds that have it there.
    """
    by_round: dict[int, list[float]] = {}
    for history in histories:
        for record in history:
            value = record.get(key)
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                by_round.setdefault(int(record["round"]), []).append(float(value))
    rounds = np.array(sorted(by_round), dtype=np.int64)
    values = [np.array(by_round[r]) for r in rounds]
    mean = np.array([v.mean() for v in values])
    low = np.array([v.min() for v in values])
    high = np.array([v.max() for v in values])
    return rounds, mean, low, high


def sphere_map(features: np.ndarray) -> SphereMap:
    """Directions of the features around their mean, on the sphere S^2, for an equal-area map.

    The rows are normalised to unit length (the sphere the losses work on), centred, projected
    on their 3 leading principal components and normalised again onto S^2: a point's position
    is the direction in which its feature departs from the mean feature.

    Args:
        features: ``(n, dim)`` raw features, ``n >= 2`` and ``dim >= 3``.

    Returns:
        Longitude and latitude of each point, and the share of the unit-norm features' variance
        that the 3 components hold.
    """
    x = features.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = x - x.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    p = x @ vt[:3].T
    captured = float((singular[:3] ** 2).sum() / max((singular**2).sum(), 1e-12))
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    longitude = np.arctan2(p[:, 1], p[:, 0])
    latitude = np.arcsin(np.clip(p[:, 2], -1.0, 1.0))
    return SphereMap(longitude=longitude, latitude=latitude, captured=captured)


# ----------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "fedssd report needs matplotlib; install it with pip install 'fedssd[report]'."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(key: str) -> str:
    names = {
        "loss": "total loss",
        "knn_acc": "kNN accuracy (%)",
        "loss_align": "alignment loss",
        "loss_dsr": "DSR loss",
        "loss_pd": "projector distillation loss",
        **NEGATED,
    }
    return names.get(key, key.replace("_", " "))


def _short_label(key: str) -> str:
    """A panel title: the label without its explanation in brackets."""
    return _label(key).split(" (")[0] if key in NEGATED else _label(key)


def curve_sign(key: str) -> float:
    """-1 for the quantities drawn negated (:data:`NEGATED`), else 1."""
    return -1.0 if key in NEGATED else 1.0


def honest_limits(low: float, high: float) -> tuple[float, float] | None:
    """Y-axis limits that include zero for a nearly flat curve, else None (automatic).

    A term whose values span less than :data:`FLAT_SHARE` of their magnitude (DSR moving from
    0.0869 to 0.0872) would otherwise be zoomed in until its rounding noise fills the panel.

    Args:
        low: The smallest value drawn.
        high: The largest value drawn.

    Returns:
        ``(bottom, top)`` or None.
    """
    magnitude = max(abs(low), abs(high))
    if not magnitude or high - low >= FLAT_SHARE * magnitude:
        return None
    pad = 0.05 * magnitude
    return (min(0.0, low) - (pad if low < 0 else 0.0), max(0.0, high) + (pad if high > 0 else 0.0))


def row_title(row: str, method: str) -> str:
    """A row's name, with its method only where the name does not already say it."""
    return row if row == method else f"{row} ({method})"


def class_names(dataset: str, count: int) -> list[str]:
    """Legend entries of ``count`` classes: the dataset's class names when known, else indices."""
    names = CLASS_NAMES.get(dataset)
    if names is not None and len(names) == count:
        return list(names)
    return [str(k) for k in range(count)]


def curves_figure(
    groups: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], path: Path, title: str
) -> list[str]:
    """Per-round curves: one panel per quantity, one line (mean) and band (min-max) per row.

    Args:
        groups: Row name -> one history per seed.
        path: PNG to write.
        title: Figure title.

    Returns:
        The quantities plotted.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    keys = curve_keys([h for histories in groups.values() for h in histories])
    columns = min(3, max(1, len(keys)))
    lines = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 3.6 * lines), squeeze=False)
    colours = plt.get_cmap("tab10")
    for index, key in enumerate(keys):
        ax: Axes = axes[index // columns][index % columns]
        scale = (100.0 if key.endswith("_acc") else 1.0) * curve_sign(key)
        drawn: list[float] = []
        for position, (row, histories) in enumerate(groups.items()):
            rounds, mean, low, high = band(histories, key)
            if rounds.size == 0:
                continue
            colour = colours(position % 10)
            seeds = len(histories)
            ax.plot(rounds, scale * mean, color=colour, marker="o", markersize=3, label=row)
            drawn.extend((scale * mean).tolist())
            if seeds > 1:
                ax.fill_between(rounds, scale * low, scale * high, color=colour, alpha=0.2)
                drawn.extend((scale * low).tolist() + (scale * high).tolist())
        ax.set_title(_short_label(key))
        ax.set_xlabel("round")
        ax.set_ylabel(_label(key) if key not in NEGATED else "-L_unif (higher is better)")
        ax.grid(alpha=0.3)
        # Tick labels show the values themselves, never an offset ("+8.69e-2") to add to them.
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        limits = honest_limits(min(drawn), max(drawn)) if drawn else None
        if limits is not None:
            ax.set_ylim(*limits)
            ax.set_title(
                f"{_short_label(key)}\n(nearly flat: {min(drawn):.4g} to {max(drawn):.4g})",
                fontsize=10,
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for index in range(len(keys), lines * columns):
        axes[index // columns][index % columns].set_visible(False)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles,
            names,
            loc="lower center",
            ncol=min(len(names), 6),
            bbox_to_anchor=(0.5, 0.0),
            frameon=False,
        )
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path)
    return keys


def partition_figure(
    partition: Mapping[str, Any], path: Path, title: str, *, dataset: str = ""
) -> None:
    """Stacked bars: for each client, its number of training images of each class (named as
    :func:`class_names` gives for ``dataset``)."""
    plt = _pyplot()
    histogram = np.asarray(partition["label_histogram"], dtype=np.int64)  # (clients, classes)
    clients, classes = histogram.shape
    fig, ax = plt.subplots(figsize=(max(7.0, 0.22 * clients + 3.5), 4.6))
    colours = _category_colours(plt, classes)
    bottom = np.zeros(clients)
    positions = np.arange(clients)
    names = class_names(dataset, classes)
    for c in range(classes):
        ax.bar(
            positions,
            histogram[:, c],
            bottom=bottom,
            color=colours[c],
            width=0.85,
            label=names[c],
        )
        bottom += histogram[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("training images")
    ax.set_title(title)
    step = max(1, clients // 25)
    ax.set_xticks(positions[::step])
    ax.set_xlim(-0.6, clients - 0.4)
    ax.set_ylim(0, 1.05 * max(1, int(histogram.sum(axis=1).max())))
    if classes <= LEGEND_LIMIT:
        ax.legend(
            title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize=8, frameon=False
        )
    else:
        _colourbar(plt, fig, ax, classes, "class")
    fig.tight_layout()
    _save(fig, path)


def uniformity_figure(
    matrices: Mapping[str, Mapping[str, np.ndarray]], path: Path, title: str
) -> None:
    """Heatmaps of -L_unif between every pair of clients (diagonal: within a client).

    Args:
        matrices: Feature name (``h``, ``z``) -> row name -> ``(K, K)`` matrix.
        path: PNG to write.
        title: Figure title.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    kinds = [k for k in matrices if matrices[k]]
    rows = list(dict.fromkeys(r for k in kinds for r in matrices[k]))
    fig, axes = plt.subplots(
        len(kinds),
        len(rows),
        figsize=(3.6 * len(rows) + 1.4, 3.4 * len(kinds) + 0.5),
        squeeze=False,
        layout="constrained",
    )
    for i, kind in enumerate(kinds):
        values = [m for m in matrices[kind].values()]
        low = min(float(np.nanmin(m)) for m in values)
        high = max(float(np.nanmax(m)) for m in values)
        image = None
        for j, row in enumerate(rows):
            ax: Axes = axes[i][j]
            matrix = matrices[kind].get(row)
            if matrix is None:
                ax.set_visible(False)
                continue
            image = ax.imshow(matrix, cmap="viridis", vmin=low, vmax=high, origin="upper")
            mean = float(np.nanmean(matrix[~np.eye(matrix.shape[0], dtype=bool)]))
            ax.set_title(f"{row} ({kind})\nmean off-diagonal {mean:.3f}", fontsize=10)
            _cell_values(ax, matrix, low, high)
            ax.set_xlabel("client j")
            ax.set_ylabel("client i")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if image is not None:
            bar = fig.colorbar(image, ax=list(axes[i]), shrink=0.9)
            bar.set_label(f"-L_unif of {kind} (clients i, j)")
    fig.suptitle(title)
    _save(fig, path)


def _cell_values(ax: Axes, matrix: np.ndarray, low: float, high: float) -> None:
    """Write each cell's value on it (up to :data:`CELL_TEXT_LIMIT` clients), dark on the light
    end of the colour scale and light on the dark end."""
    size = matrix.shape[0]
    if size > CELL_TEXT_LIMIT:
        return
    middle = (low + high) / 2
    fontsize = 8 if size <= 6 else max(4.0, 8 - 0.3 * (size - 6))
    for i in range(size):
        for j in range(matrix.shape[1]):
            value = float(matrix[i, j])
            if not math.isfinite(value):
                continue
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="black" if value > middle else "white",
            )


def embedding_figure(
    maps: Mapping[str, SphereMap],
    clients: np.ndarray,
    labels: np.ndarray,
    path: Path,
    title: str,
    *,
    dataset: str = "",
) -> None:
    """Embeddings on the sphere (equal-area Mollweide map), coloured by client and by class.

    Args:
        maps: Feature name (``h``, ``z``) -> its :class:`SphereMap`.
        clients: ``(n,)`` client of each point.
        labels: ``(n,)`` class of each point.
        path: PNG to write.
        title: Figure title.
        dataset: The dataset's name, whose class names (:func:`class_names`) the legend shows.
    """
    plt = _pyplot()
    fig = plt.figure(figsize=(13, 3.9 * len(maps) + 0.6))
    num_clients = int(clients.max()) + 1
    known = CLASS_NAMES.get(dataset, ())
    num_classes = max(int(labels.max()) + 1, len(known))
    for i, (kind, sphere) in enumerate(maps.items()):
        for j, (name, values, count) in enumerate(
            (("client", clients, num_clients), ("class", labels, num_classes))
        ):
            ax = fig.add_subplot(len(maps), 2, 2 * i + j + 1, projection="mollweide")
            colours = _category_colours(plt, count)
            ax.scatter(
                sphere.longitude,
                sphere.latitude,
                c=colours[values],
                s=6,
                alpha=0.75,
                linewidths=0,
            )
            ax.set_title(
                f"{kind} coloured by {name} (3 components: {100 * sphere.captured:.0f}% "
                "of the variance)",
                fontsize=10,
            )
            ax.set_xticklabels([])
            ax.set_yticklabels([])
            ax.grid(alpha=0.3)
            if count <= LEGEND_LIMIT:
                names = class_names(dataset, count) if name == "class" else None
                handles = [
                    plt.Line2D(
                        [],
                        [],
                        marker="o",
                        linestyle="",
                        color=colours[k],
                        label=names[k] if names else str(k),
                    )
                    for k in range(count)
                ]
                ax.legend(
                    handles=handles,
                    title=name,
                    bbox_to_anchor=(1.02, 1),
                    loc="upper left",
                    fontsize=7,
                    title_fontsize=8,
                    frameon=False,
                    ncol=1 if count <= 10 else 2,
                )
            else:
                _colourbar(plt, fig, ax, count, name)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _category_colours(plt: Any, count: int) -> np.ndarray:
    """``(count, 4)`` RGBA colours: tab10 / tab20 for few categories, turbo for many."""
    if count <= 10:
        return np.asarray(plt.get_cmap("tab10")(np.arange(count)))
    if count <= 20:
        return np.asarray(plt.get_cmap("tab20")(np.arange(count)))
    return np.asarray(plt.get_cmap("turbo")(np.linspace(0, 1, count)))


def _colourbar(plt: Any, fig: Figure, ax: Axes, count: int, name: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    mappable = ScalarMappable(norm=Normalize(0, count - 1), cmap=plt.get_cmap("turbo"))
    bar = fig.colorbar(mappable, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(name)


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


# ----------------------------------------------------------------------------- embeddings


def embed_sample(
    run_dir: Path, *, samples: int, cache: dict[Any, Any], log: Log
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The model's h and z of a random sample of the clients' training images.

    Args:
        run_dir: A finished run.
        samples: Largest number of images.
        cache: Data loaded for earlier runs, keyed by what the data depends on (reused here).
        log: Progress lines.

    Returns:
        ``({"h": (n, feature_dim), "z": (n, embed_dim)}, clients (n,), labels (n,))``.
    """
    from fedssd.data.federated import prepare_data
    from fedssd.evaluation.features import extract_features
    from fedssd.runs.model import load_run

    config, model = load_run(run_dir)
    key = (config.seed, config.data, config.federation.num_clients)
    if key not in cache:
        cache[key] = prepare_data(config, log=log).evaluation_views()
    views = cache[key]
    total = int(views.train_labels.shape[0])
    rng = np.random.default_rng(config.seed)
    index = np.sort(rng.choice(total, size=min(samples, total), replace=False))
    chosen = views.train_images[index]
    h, z = extract_features(model, chosen, batch_size=config.evaluation.batch_size)
    return (
        {"h": h.numpy(), "z": z.numpy()},
        views.train_clients[index].numpy(),
        views.train_labels[index].numpy(),
    )


# ----------------------------------------------------------------------------- the report


def build_report(
    folder: Path,
    *,
    embedding_samples: int = 2000,
    embeddings: bool = True,
    log: Log | None = None,
) -> Path:
    """Write the figures and ``report.md`` of a run or sweep folder.

    Args:
        folder: A folder written by ``fedssd train`` or ``fedssd sweep``.
        embedding_samples: Training images embedded for each sphere map.
        embeddings: Draw the sphere maps (they load every first-seed model and its data).
        log: Progress lines.

    Returns:
        The path of ``report.md``.

    Raises:
        DataError: The folder holds no run.
    """
    say: Log = log or (lambda _message: None)
    kind, runs = find_runs(folder)
    figures_dir = folder / FIGURES
    settings = list(dict.fromkeys(r.setting for r in runs))
    sections: list[tuple[str, list[Figure_]]] = []
    cache: dict[Any, Any] = {}
    for setting in settings:
        mine = [r for r in runs if r.setting == setting]
        rows = list(dict.fromkeys(r.row for r in mine))
        seeds = sorted({r.seed for r in mine})
        first_seed = seeds[0]
        firsts = {row: next(r for r in mine if r.row == row) for row in rows}
        slug = _slug(setting)
        where = f"{setting}: " if kind == "sweep" else ""
        dataset = _config(mine[0].path).data.name
        figures: list[Figure_] = []

        say(f"report: curves of {setting}")
        groups = {row: [read_metrics(r.path) for r in mine if r.row == row] for row in rows}
        path = figures_dir / f"curves-{slug}.png"
        keys = curves_figure(groups, path, f"{where}per-round training curves")
        spread = (
            f"the line is the mean over {len(seeds)} seeds and the band their minimum to maximum"
            if len(seeds) > 1
            else "one seed"
        )
        figures.append(
            Figure_(
                path,
                "Per-round curves",
                f"{', '.join(_label(k) for k in keys)} of the global model per round, one colour "
                f"per row; {spread}. kNN accuracy is measured on the rounds the run's "
                "evaluation.every asks for. The uniformity loss is drawn as -L_unif (higher is "
                "more uniform), the sign of the tables; a nearly flat term is drawn with zero "
                "on its axis and its range in the panel title.",
            )
        )

        partition = _json(firsts[rows[0]].path / "partition.json")
        if partition is not None:
            path = figures_dir / f"partition-{slug}.png"
            sizes = partition.get("sizes", [])
            partition_figure(
                partition,
                path,
                f"{where}training images per client and class (seed {first_seed})",
                dataset=dataset,
            )
            figures.append(
                Figure_(
                    path,
                    "Partition",
                    f"Label histogram of each client's training images ({partition.get('scheme')}"
                    f" split of seed {first_seed}, which every row of that seed shares; "
                    f"{len(sizes)} clients, {min(sizes, default=0)} to {max(sizes, default=0)} "
                    "images).",
                )
            )

        matrices: dict[str, dict[str, np.ndarray]] = {"h": {}, "z": {}}
        for row, run in firsts.items():
            summary = _json(run.path / "summary.json") or {}
            for kind_name, key in (("h", "uniformity_inter"), ("z", "uniformity_inter_z")):
                if summary.get(key) is not None:
                    matrices[kind_name][row] = np.asarray(summary[key], dtype=np.float64)
        if any(matrices.values()):
            path = figures_dir / f"uniformity-{slug}.png"
            uniformity_figure(
                {k: v for k, v in matrices.items() if v},
                path,
                f"{where}uniformity between clients (seed {first_seed})",
            )
            figures.append(
                Figure_(
                    path,
                    "Inter-client uniformity",
                    "-L_unif (t = 2, higher is more uniform) between the unit-norm features of "
                    "clients i and j (diagonal: within one client), for the encoder output h and "
                    f"the projector output z of each row's seed-{first_seed} model; one colour "
                    "scale per feature.",
                )
            )

        if embeddings:
            for row, run in firsts.items():
                if not (run.path / "model.safetensors").is_file():
                    continue
                say(f"report: embedding map of {setting}/{row}")
                features, clients, labels = embed_sample(
                    run.path, samples=embedding_samples, cache=cache, log=say
                )
                maps = {name: sphere_map(values) for name, values in features.items()}
                path = figures_dir / f"embeddings-{slug}-{_slug(row)}.png"
                embedding_figure(
                    maps,
                    clients,
                    labels,
                    path,
                    f"{where}{row_title(row, run.method)}, seed {run.seed}: embeddings on the "
                    "sphere",
                    dataset=dataset,
                )
                figures.append(
                    Figure_(
                        path,
                        f"Embeddings: {row}",
                        f"{len(labels)} training images of every client, embedded by the final "
                        f"global model of {row} (seed {run.seed}); h (encoder) and z (projector) "
                        "are normalised to unit length, centred, projected on their 3 leading "
                        "principal components (the share of variance they hold is in each "
                        "title) and normalised onto the sphere S^2, so that a point shows the "
                        "direction in which its feature departs from the mean feature; the "
                        "sphere is drawn in the equal-area Mollweide projection. Left: coloured "
                        "by client; right: by class.",
                    )
                )
        sections.append((setting, figures))
    text = render_markdown(folder, kind, runs, sections)
    report = folder / "report.md"
    from fedssd.runs.outputs import write_text_atomic

    write_text_atomic(report, text)
    return report


def render_markdown(
    folder: Path, kind: str, runs: Sequence[RunInfo], sections: Sequence[tuple[str, list[Figure_]]]
) -> str:
    """``report.md``: the table (of a sweep) or summary (of a run), then every figure."""
    lines: list[str] = []
    if kind == "sweep":
        description = _json(folder / "sweep.json") or {}
        lines += [f"# Report: {description.get('title', folder.name)}", ""]
        seeds = sorted({r.seed for r in runs})
        lines += [
            f"{len(runs)} runs in `{folder}`: settings "
            f"{', '.join(dict.fromkeys(r.setting for r in runs))}; rows "
            f"{', '.join(dict.fromkeys(r.row for r in runs))}; seeds "
            f"{', '.join(map(str, seeds))}.",
            "",
        ]
        table = folder / "table.md"
        if table.is_file():
            body = table.read_text(encoding="utf-8").strip().splitlines()[1:]
            while body and not body[0].strip():
                body = body[1:]
            lines += ["## Table", ""]
            lines += [("#" + line) if line.startswith("#") else line for line in body]
            lines += [""]
    elif kind == "compare":
        seeds = sorted({r.seed for r in runs})
        lines += [f"# Report: comparison `{folder.name}`", ""]
        lines += [
            f"{len(runs)} runs in `{folder}`: methods {', '.join(r.row for r in runs)}; seed "
            f"{', '.join(map(str, seeds))}.",
            "",
        ]
        table = folder / "table.md"
        if table.is_file():
            lines += ["## Final evaluation", "", table.read_text(encoding="utf-8").strip(), ""]
    else:
        run = runs[0]
        lines += [f"# Report: {run.method} run `{folder.name}` (seed {run.seed})", ""]
        summary = _json(folder / "summary.json")
        if summary is not None:
            from fedssd.experiments.tables import format_table

            lines += ["## Final evaluation", "", format_table({run.method: summary}), ""]
            lines += _sites_section(folder, summary)
        else:
            lines += ["The run has no summary.json: it did not finish.", ""]
    for setting, figures in sections:
        if kind == "sweep":
            lines += [f"## Setting `{setting}`", ""]
        for figure in figures:
            relative = figure.path.relative_to(folder).as_posix()
            lines += [
                f"### {figure.title}",
                "",
                f"![{figure.title}]({relative})",
                "",
                figure.caption,
                "",
            ]
    return "\n".join(lines)


def _sites_section(folder: Path, summary: Mapping[str, Any]) -> list[str]:
    """``report.md``'s per-site table: ``summary.json``'s, else built from the run's files (a
    run written before the summary carried it); none for a DP run, which keeps it on the
    server."""
    rows = summary.get("sites")
    if not isinstance(rows, list):
        if _config(folder).privacy.dp != "off":
            return []
        partition = _json(folder / "partition.json")
        if partition is None:
            return []
        rows = site_table(partition, read_metrics(folder), summary)
    return [
        "## Sites",
        "",
        "Each client's images (labelled ones among them), the rounds it was sampled in, those "
        "its update was aggregated in, failed (no update: a fault, no reply) or was rejected by "
        "the server's checks (the reason is in metrics.jsonl), and the final model's metrics on "
        "its own images where the run has them (-L_unif: uniformity of its features, higher is "
        "more uniform; kNN, alignment and effective rank from a federated evaluation).",
        "",
        format_site_table(rows),
        "",
    ]


def _slug(name: str) -> str:
    name = name.replace("+", "plus")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
