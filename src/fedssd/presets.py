"""The files shipped inside the package: presets, sweep grids, split files and the Flower App.

They live in ``fedssd/configs/`` (``src/fedssd/configs/`` in the repository) and are found by name
from any folder: a preset's name is its path there without ``.toml`` (``demo``, ``ssd-silo``,
``paper/cifar10-silo-ssd``), a grid's is its path under ``grids/`` without ``.toml``
(``paper-main``), a split file's is its path (``splits/cifar10_dir_client10_alpha0.1.json``).
A path that exists on disk always wins over a name.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from fedssd.errors import ConfigError

__all__ = [
    "FLOWER_APP_FILES",
    "ROOT",
    "Entry",
    "config_path",
    "entries",
    "grid_path",
    "packaged",
    "split_path",
    "write_flower_app",
]

ROOT = Path(__file__).resolve().parent / "configs"
"""The folder of the packaged files."""

FLOWER_APP_FILES = ("pyproject.toml", "fedssd.toml")
"""The Flower App's files, in ``configs/flower_app/``."""

_HINT = "`fedssd configs` lists the names"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One packaged file: its kind (preset, grid, split), name, path and one-line description."""

    kind: str
    name: str
    path: Path
    description: str


def _description(path: Path) -> str:
    """The first comment line of a TOML file (``""`` when it opens with none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        return stripped.lstrip("#").strip() if stripped.startswith("#") else ""
    return ""


def entries() -> list[Entry]:
    """Every packaged preset, grid and split file, sorted by kind then name."""
    found: list[Entry] = []
    for path in sorted(ROOT.rglob("*.toml")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] == "flower_app":
            continue
        if relative.parts[0] == "grids":
            name = relative.relative_to("grids").with_suffix("").as_posix()
            found.append(Entry("grid", name, path, _description(path)))
        else:
            name = relative.with_suffix("").as_posix()
            found.append(Entry("preset", name, path, _description(path)))
    for path in sorted((ROOT / "splits").glob("*.json")):
        found.append(
            Entry("split", path.relative_to(ROOT).as_posix(), path, "the paper's client split")
        )
    order = {"preset": 0, "grid": 1, "split": 2}
    return sorted(found, key=lambda e: (order[e.kind], e.name))


def packaged(name: str, folder: str = "") -> Path | None:
    """The packaged TOML file called ``name`` (with or without ``.toml``) under ``folder``."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    stem = name[: -len(".toml")] if name.endswith(".toml") else name
    path = ROOT / folder / f"{stem}.toml"
    return path if path.is_file() and not stem.startswith("flower_app") else None


def config_path(config: str | Path) -> Path:
    """The config file ``config`` names: a file on disk, else a packaged preset.

    Raises:
        ConfigError: Neither exists, in one sentence.
    """
    path = Path(config).expanduser()
    if path.is_file():
        return path
    found = packaged(str(config))
    if found is None:
        raise ConfigError(
            f"config file {config} does not exist and is not the name of a preset; {_HINT}."
        )
    return found


def grid_path(grid: str | Path) -> Path:
    """The grid file ``grid`` names: a file on disk, else a packaged grid.

    Raises:
        ConfigError: Neither exists, in one sentence.
    """
    path = Path(grid).expanduser()
    if path.is_file():
        return path
    name = str(grid)
    found = packaged(name.removeprefix("grids/"), "grids")
    if found is None:
        raise ConfigError(
            f"grid file {grid} does not exist and is not the name of a grid; {_HINT}."
        )
    return found


def split_path(split_file: str) -> str:
    """``split_file`` as given when it exists (relative to the working folder), else the packaged
    split file of that name (``splits/<file>.json``, or the bare file name) when there is one."""
    path = Path(split_file).expanduser()
    if path.exists() or path.is_absolute() or ".." in path.parts:
        return split_file
    for candidate in (ROOT / path, ROOT / "splits" / path):
        if candidate.is_file() and candidate.suffix == ".json":
            return str(candidate)
    return split_file


def write_flower_app(folder: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the Flower App (``pyproject.toml`` and ``fedssd.toml``) into ``folder``.

    Returns:
        The files written.

    Raises:
        ConfigError: A file is already there and ``overwrite`` is false (nothing is written).
    """
    targets = [folder / name for name in FLOWER_APP_FILES]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]} already exists; choose another folder or pass --overwrite."
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in zip(FLOWER_APP_FILES, targets, strict=True):
        shutil.copyfile(ROOT / "flower_app" / name, target)
    return targets
