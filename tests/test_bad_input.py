"""Issue 3: every user-facing entry refuses bad input with exit 2 and one sentence, writing nothing.

A property-based test throws generated malformed configs and overrides at the CLI; table-driven
tests cover each class of bad data (npz arrays, split files, partitions) through the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedssd.api
from fedssd.cli import main
from fedssd.config import Config, read_toml
from fedssd.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "src" / "fedssd" / "configs" / "smoke.toml"
BASE: dict[str, Any] = read_toml(SMOKE)


def _scalar_keys() -> list[tuple[str, str, Any]]:
    """(table, key, type hint) of every scalar config key, method options of ssd included."""
    keys: list[tuple[str, str, Any]] = []
    for field in dataclasses.fields(Config):
        hint = typing.get_type_hints(Config)[field.name]
        if field.name == "method":
            for option in dataclasses.fields(METHODS["ssd"].options):
                keys.append(("method", option.name, option.type))
        elif dataclasses.is_dataclass(hint):
            for sub in dataclasses.fields(hint):
                keys.append((field.name, sub.name, sub.type))
        else:
            keys.append(("", field.name, hint))
    return keys


KEYS = _scalar_keys()
NUMERIC = [k for k in KEYS if str(k[2]) in ("int", "float")]


def _with(raw: dict[str, Any], table: str, key: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    (out.setdefault(table, {}) if table else out)[key] = value
    return out


def _wrong_values(hint: Any) -> list[Any]:
    """Values of the wrong type for a key: an empty list is a valid list of paths."""
    if str(hint).startswith("tuple"):
        return [[1, 2], {"x": 1}, {}, "site_a/", [["nested"]]]
    return [[1, 2], {"x": 1}, [], {}]


wrong_type = st.sampled_from(KEYS).flatmap(
    lambda k: st.sampled_from(_wrong_values(k[2])).map(lambda v: _with(BASE, k[0], k[1], v))
)
out_of_range = st.sampled_from(NUMERIC).flatmap(
    lambda k: st.sampled_from([-1, -0.5, -1e9]).map(lambda v: _with(BASE, k[0], k[1], v))
)
unknown_key = st.tuples(
    st.sampled_from(
        [
            "",
            "data",
            "model",
            "federation",
            "evaluation",
            "checkpoint",
            "faults",
            "validation",
            "method",
        ]
    ),
    st.from_regex(r"[a-z]{1,8}_zz", fullmatch=True),
    st.one_of(st.integers(), st.text(max_size=5), st.booleans()),
).map(lambda t: _with(BASE, t[0], t[1], t[2]))
unknown_choice = st.sampled_from(
    [
        ("data", "name", "imagenet22k"),
        ("data", "partition", "shards"),
        ("model", "encoder", "vit_huge"),
        ("method", "name", "nosuchmethod"),
        ("", "precision", "fp8"),
        ("", "device", "tpu"),
        ("method", "dsr_form", "other"),
        ("federation", "lr_schedule", "step"),
    ]
).map(lambda t: _with(BASE, *t))
bad_configs = st.one_of(wrong_type, out_of_range, unknown_key, unknown_choice)

bad_overrides = st.one_of(
    st.sampled_from(
        [
            "federation.rounds",
            "=5",
            "data.name.sub=3",
            "nosuch.key=1",
            "federation.rounds=abc",
            "federation.fraction=0",
            "federation.fraction=1.5",
            "data.alpha=0",
            "federation.num_clients=100000",
            "method.dsr_alpha=-1",
            "faults.crash=2",
            "checkpoint.keep=0",
            "seed=-3",
            "federation.rounds=nan",
        ]
    ),
    st.from_regex(r"[a-z]{1,6}\.[a-z]{1,6}_zz=[0-9]{1,3}", fullmatch=True),
)


class WouldTrain(Exception):
    """Raised if a generated input were accepted (the test then fails: the input was valid)."""


def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    return code, err.getvalue()


def _assert_refused(code: int, err: str, out: Path) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedssd: error: "), err
    assert lines[0].endswith("."), err
    assert "Traceback" not in err
    # What was in the output folder before is untouched, and nothing was added.
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "earlier results\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


def _refuse_training(*_args: Any, **_kwargs: Any) -> Any:
    raise WouldTrain


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@pytest.mark.slow
@given(raw=bad_configs)
def test_generated_bad_configs_exit_2_with_one_sentence(
    raw: dict[str, Any], folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fedssd.api, "build_experiment", _refuse_training)
    config, out = folder / "config.toml", folder / "out"
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("earlier results\n")
    config.write_text(tomli_w.dumps(raw))
    code, err = _cli(["train", "--config", str(config), "--out", str(out), "--quiet"])
    _assert_refused(code, err, out)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(override=bad_overrides, command=st.sampled_from(["train", "compare"]))
def test_generated_bad_overrides_exit_2_with_one_sentence(
    override: str, command: str, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fedssd.api, "build_experiment", _refuse_training)
    out = folder / "out"
    out.mkdir(exist_ok=True)
    (out / "notes.txt").write_text("earlier results\n")
    code, err = _cli(
        [command, "--config", str(SMOKE), "--set", override, "--out", str(out), "--quiet"]
    )
    _assert_refused(code, err, out)


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    base = {
        "x_train": rng.integers(0, 255, (40, 32, 32), dtype=np.uint8),
        "y_train": np.arange(40) % 4,
        "x_test": rng.integers(0, 255, (8, 32, 32), dtype=np.uint8),
        "y_test": np.arange(8) % 4,
    }
    np.savez(path, **{**base, **arrays})
    return path


@pytest.mark.parametrize(
    ("make", "overrides", "fragment"),
    [
        (
            lambda p: _npz(p),
            ["federation.num_clients=41", "data.partition=iid", "method.name=fedalignuniform"],
            "only 40 samples",
        ),
        (lambda p: _npz(p, y_train=np.arange(40) % 4 - 1), [], "negative label"),
        (lambda p: _npz(p, x_train=np.zeros((40, 32, 32), np.float32)), [], "dtype float32"),
        (lambda p: _npz(p, x_test=np.zeros((8, 16, 16), np.uint8)), [], "same size"),
        (
            lambda p: _npz(
                p,
                x_train=np.zeros((40, 32, 30), np.uint8),
                x_test=np.zeros((8, 32, 30), np.uint8),
            ),
            ["data.pad_to_32=false", "data.partition=iid"],
            "square",
        ),
        (lambda p: _npz(p), ["data.min_client_size=30"], "samples"),
    ],
)
def test_bad_data_through_the_cli(
    tmp_path: Path, make: Any, overrides: list[str], fragment: str
) -> None:
    path = make(tmp_path / "data.npz")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("earlier results\n")
    args = ["train", "--config", str(SMOKE), "--out", str(out), "--quiet"]
    for item in ["data.name=npz", f"data.path={json.dumps(str(path))}", *overrides]:
        args += ["--set", item]
    code, err = _cli(args)
    _assert_refused(code, err, out)
    assert fragment in err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ([[0, 1], [1, 2]], "more than one"),
        ([[0], [2]], "never uses index 1"),
        ([[0, 1, 2], []], "no samples"),
    ],
)
def test_bad_split_files_through_the_cli(tmp_path: Path, content: Any, fragment: str) -> None:
    data = _npz(
        tmp_path / "data.npz",
        x_train=np.zeros((3, 32, 32), np.uint8),
        y_train=np.array([0, 1, 2]),
        y_test=np.arange(8) % 3,
    )
    split = tmp_path / "split.json"
    split.write_text(json.dumps(content))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("earlier results\n")
    args = ["train", "--config", str(SMOKE), "--out", str(out), "--quiet"]
    for item in [
        "data.name=npz",
        f"data.path={json.dumps(str(data))}",
        "data.partition=file",
        f"data.split_file={json.dumps(str(split))}",
        "data.train_subset=0",
        "data.test_subset=0",
        f"federation.num_clients={len(content)}",
    ]:
        args += ["--set", item]
    code, err = _cli(args)
    _assert_refused(code, err, out)
    assert fragment in err
