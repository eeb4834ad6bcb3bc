"""The packaged presets, grids, split files and Flower App: names, `fedssd configs`, the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from fedssd import presets
from fedssd.cli import main
from fedssd.config import read_toml
from fedssd.errors import ConfigError
from fedssd.runs.resolve import load_config

REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "src" / "fedssd" / "configs"

# What a wheel and an sdist must hold, relative to the fedssd package.
REQUIRED = (
    "configs/demo.toml",
    "configs/smoke.toml",
    "configs/ssd-silo.toml",
    "configs/paper/cifar10-silo-ssd.toml",
    "configs/grids/paper-main.toml",
    "configs/grids/base-fmnist.toml",
    "configs/splits/cifar10_dir_client10_alpha0.1.json",
    "configs/splits/README.md",
    "configs/flower_app/pyproject.toml",
    "configs/flower_app/fedssd.toml",
)


def test_presets_resolve_from_any_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert presets.config_path("demo") == PACKAGED / "demo.toml"
    assert presets.config_path("demo.toml") == PACKAGED / "demo.toml"
    assert presets.config_path("paper/cifar10-silo-ssd") == PACKAGED / "paper/cifar10-silo-ssd.toml"
    cfg = load_config("paper/cifar10-silo-ssd")
    assert cfg.data.name == "cifar10" and cfg.federation.num_clients == 10
    # The paper's split files by their packaged name, from an empty folder.
    split = "splits/cifar10_dir_client10_alpha0.1.json"
    cfg = load_config("paper/cifar10-silo-ssd", overrides=[f"data.split_file={split}"])
    assert cfg.data.split_file == str(PACKAGED / split)
    assert len(json.loads(Path(cfg.data.split_file).read_text())) == 10


def test_a_file_on_disk_wins_over_a_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("seed = 3\n")
    assert presets.config_path("demo") == Path("demo")
    assert load_config("demo").seed == 3
    # A user's own relative split file stays relative to the working folder.
    (tmp_path / "splits").mkdir()
    mine = tmp_path / "splits" / "cifar10_dir_client10_alpha0.1.json"
    mine.write_text("[[0], [1]]")
    split = "data.split_file=splits/cifar10_dir_client10_alpha0.1.json"
    cfg = load_config("paper/cifar10-silo-ssd", overrides=[split])
    assert cfg.data.split_file == str(mine)


def test_an_unknown_name_points_to_fedssd_configs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*`fedssd configs`"):
        presets.config_path("no-such-preset")
    assert main(["train", "--config", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fedssd configs" in err


def test_fedssd_configs_lists_every_packaged_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0] for line in lines if line.startswith("  ")}
    on_disk = {
        p.relative_to(PACKAGED).with_suffix("").as_posix()
        for p in PACKAGED.rglob("*.toml")
        if p.parts[len(PACKAGED.parts)] not in ("grids", "flower_app")
    }
    grids = {p.stem for p in (PACKAGED / "grids").glob("*.toml")}
    splits = {f"splits/{p.name}" for p in (PACKAGED / "splits").glob("*.json")}
    assert listed == on_disk | grids | splits
    assert {"demo", "smoke", "ssd-silo", "paper/cifar10-silo-ssd", "paper-main"} <= listed
    demo = next(line for line in lines if line.split()[0] == "demo")
    first_comment = (PACKAGED / "demo.toml").read_text().splitlines()[0].lstrip("# ")
    assert demo.split(None, 1)[1] == first_comment


def test_fedssd_configs_name_prints_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs", "paper/cifar10-silo-ssd"]) == 0
    assert capsys.readouterr().out == (PACKAGED / "paper/cifar10-silo-ssd.toml").read_text()
    assert main(["configs", "grids/paper-main"]) == 0
    assert capsys.readouterr().out == (PACKAGED / "grids/paper-main.toml").read_text()
    assert main(["configs", "nothing"]) == 2


def test_flower_app_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = tmp_path / "app"
    assert main(["flower-app", str(app)]) == 0
    assert sorted(p.name for p in app.iterdir()) == ["fedssd.toml", "pyproject.toml"]
    project = read_toml(app / "pyproject.toml")
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "fedssd.flower.server_app:app",
        "clientapp": "fedssd.flower.client_app:app",
    }
    assert project["tool"]["flwr"]["app"]["config"]["config"] == "fedssd.toml"
    assert load_config(app / "fedssd.toml").federation.num_clients == 3
    # A second write refuses to replace the files, unless told to.
    (app / "fedssd.toml").write_text("seed = 1\n")
    assert main(["flower-app", str(app)]) == 2
    assert (app / "fedssd.toml").read_text() == "seed = 1\n"
    assert main(["flower-app", str(app), "--overwrite"]) == 0
    assert (app / "fedssd.toml").read_bytes() == (PACKAGED / "flower_app/fedssd.toml").read_bytes()


def _build(tmp_path: Path) -> tuple[Path, Path]:
    """The wheel and sdist of the repository, built from a copy (so that no build files land in
    the checkout) into tmp_path/dist."""
    source = tmp_path / "source"
    top = {".git", ".venv", "runs", "data", "build", "dist"}  # at the root only: not fedssd/data

    def skip(folder: str, names: list[str]) -> set[str]:
        junk = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", "_cache"))}
        return junk | (top & set(names) if Path(folder) == REPO else set())

    shutil.copytree(REPO, source, ignore=skip)
    dist = tmp_path / "dist"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        import build  # noqa: F401

        command = [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(source),
        ]
        subprocess.run(command, check=True, capture_output=True, env=env, timeout=600)
    except ImportError:
        # No `build`: pip for the wheel, setuptools' own sdist command for the sdist.
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--wheel-dir", str(dist), str(source)],
            check=True, capture_output=True, env=env, timeout=600,
        )  # fmt: skip
        subprocess.run(
            [sys.executable, "-c",
             "import sys, setuptools.build_meta as b; b.build_sdist(sys.argv[1])", str(dist)],
            check=True, capture_output=True, cwd=source, env=env, timeout=600,
        )  # fmt: skip
    (wheel,) = dist.glob("fedssd-*.whl")
    (sdist,) = dist.glob("fedssd-*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_the_wheel_works_outside_the_repository(tmp_path: Path) -> None:
    """Build the wheel and sdist, check they hold the package data, install the wheel and run
    `fedssd configs` and a smoke experiment from it in an empty folder."""
    wheel, sdist = _build(tmp_path)
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as archive:
        in_sdist = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for name in REQUIRED:
        assert f"fedssd/{name}" in in_wheel, name
        assert f"src/fedssd/{name}" in in_sdist, name

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}

    def fedssd(*args: str) -> str:
        code = "import sys; from fedssd.cli import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=empty, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = subprocess.run(
        [sys.executable, "-c", "import fedssd; print(fedssd.__file__)"],
        cwd=empty, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(where).is_relative_to(target), where
    listing = fedssd("configs")
    assert "paper/cifar10-silo-ssd" in listing and "paper-main" in listing
    assert "splits/cifar10_dir_client10_alpha0.1.json" in listing
    fedssd(
        "train", "--config", "smoke", "--out", "run", "--quiet",
        "--set", "federation.rounds=1", "--set", "evaluation.linear_epochs=1",
    )  # fmt: skip
    summary = json.loads((empty / "run" / "summary.json").read_text())
    assert summary
    fedssd("flower-app", "app")
    assert sorted(p.name for p in (empty / "app").iterdir()) == ["fedssd.toml", "pyproject.toml"]
    fedssd("sweep", "paper-main", "--out", "sweep", "--dry-run")
