"""Configuration parsing: defaults, overrides, round trip and every class of rejected input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from fedssd import config
from fedssd.errors import ConfigError
from fedssd.runs.resolve import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "fedssd" / "configs"
SMOKE = CONFIGS / "smoke.toml"


def test_defaults_are_the_papers_protocol() -> None:
    cfg = config.load()
    assert cfg.seed == 17
    assert cfg.federation.rounds == 100 and cfg.federation.local_epochs == 5
    assert cfg.federation.batch_size == 128 and cfg.federation.lr == 0.1
    assert cfg.federation.momentum == 0.9 and cfg.federation.weight_decay == 1e-4
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.1
    assert cfg.model.encoder == "resnet18" and cfg.model.projector_hidden == 2048


def test_overrides_are_read_as_toml_or_bare_strings() -> None:
    cfg = config.load(
        None,
        [
            "federation.rounds=3",
            "data.alpha=0.5",
            "method.name=fedalignuniform",
            "data.download=false",
            'data.name="mnist"',
        ],
    )
    assert cfg.federation.rounds == 3
    assert cfg.data.alpha == 0.5
    assert cfg.method.name == "fedalignuniform"
    assert cfg.data.download is False
    assert cfg.data.name == "mnist"


def test_resize_filter_defaults_to_box_and_takes_the_released_filter() -> None:
    assert config.load().data.resize == "box"
    assert config.load(None, ["data.resize=bilinear-antialias"]).data.resize == (
        "bilinear-antialias"
    )


def test_resize_filters_of_the_config_are_the_readers() -> None:
    from typing import get_args

    from fedssd.data.datasets import RESIZE_FILTERS

    assert get_args(config.ResizeFilter) == RESIZE_FILTERS


def test_options_added_later_keep_the_checkpoint_identity_of_older_runs() -> None:
    """A checkpoint written before data.resize, data.dirichlet_rule, federation.drop_last,
    federation.sampling and method.dsr_dims existed has an identity without them: at their
    defaults a run still matches it; any other value is part of the identity."""
    from fedssd.runs.checkpoint import run_identity

    current = config.to_dict(load_config(SMOKE))
    older = copy.deepcopy(current)
    for table, key in [
        ("data", "resize"),
        ("data", "dirichlet_rule"),
        ("federation", "drop_last"),
        ("federation", "sampling"),
        ("method", "dsr_dims"),
    ]:
        assert key in current[table]
        del older[table][key]
    assert run_identity(current) == run_identity(older)
    for override, table, key, value in [
        ("data.resize=bilinear-antialias", "data", "resize", "bilinear-antialias"),
        ("data.dirichlet_rule=released", "data", "dirichlet_rule", "released"),
        ("federation.drop_last=true", "federation", "drop_last", True),
        ("federation.sampling=poisson", "federation", "sampling", "poisson"),
        ("method.dsr_dims=4", "method", "dsr_dims", 4),
    ]:
        changed = run_identity(config.to_dict(load_config(SMOKE, overrides=[override])))
        assert changed[table] == {**run_identity(older)[table], key: value}


def test_an_integer_is_accepted_where_a_number_is_expected() -> None:
    assert config.load(None, ["data.alpha=1"]).data.alpha == 1.0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    written = tmp_path / "config.toml"
    written.write_text(config.dumps(cfg))
    assert load_config(written) == cfg


def test_method_options_are_filled_in_and_round_trip(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "smoke.toml", overrides=["method.dsr_form=released"])
    assert cfg.method.options["dsr_form"] == "released"
    assert cfg.method.options["dsr_alpha"] == 10.0
    assert cfg.method.options["pd_weight"] == 0.1
    text = config.dumps(cfg)
    assert 'dsr_form = "released"' in text


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["federation.round=3"], "unknown config key 'federation.round'"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["federation.rounds=three"], "federation.rounds must be an integer"),
        (["federation.rounds=2.5"], "federation.rounds must be an integer"),
        (["data.download=1"], "data.download must be true or false"),
        (["data.alpha=0"], "data.alpha must be > 0"),
        (["data.alpha=-1"], "data.alpha must be > 0"),
        (["federation.fraction=0"], "federation.fraction must be in (0, 1]"),
        (["federation.fraction=1.5"], "federation.fraction must be in (0, 1]"),
        (["federation.num_clients=0"], "federation.num_clients must be at least 1"),
        (["data.partition=random"], "data.partition must be one of"),
        (["data.partition=file"], "needs data.split_file"),
        (["data.name=npz"], "needs data.path"),
        (["device=gpu"], "device must be"),
        (["federation.batch_size=1"], "federation.batch_size must be at least 2"),
        (["data=3"], "data must be a table"),
        (["federation.rounds"], "is not of the form key=value"),
        (["data.alpha.x=1"], "data.alpha must be a number"),
        (["data.alpha=nan"], "must be a finite number"),
        (["data.resize=bicubic"], "data.resize must be one of 'box', 'bilinear-antialias'"),
    ],
)
def test_bad_values_are_refused_with_one_sentence(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["method.name=nope"], "unknown method 'nope'"),
        (["method.dsr_alpha=x"], "method.dsr_alpha must be a number"),
        (["method.dsr_form=other"], "method.dsr_form must be one of"),
        (["method.unknown_option=1"], "unknown config key 'method.unknown_option'"),
    ],
)
def test_bad_method_options_are_refused(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_config(CONFIGS / "smoke.toml", overrides=overrides)
    assert fragment in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="is a folder"):
        config.load(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["seed=-1"], "seed must be a non-negative integer"),
        (["device=mps"], "device must be"),
        (["data.partition=file", "data.split_file=x.json", "data.train_subset=10"], "split file"),
    ],
)
def test_more_refused_values(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        config.load(None, overrides)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "override",
    [
        "method.pd_temperature=0",
        "method.dsr_alpha=-5",
        "method.dsr_weight=-1",
        "method.pd_weight=-0.1",
        "method.uniformity_t=0",
        "method.uniformity_weight=-1",
    ],
)
def test_method_option_ranges(override: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "smoke.toml", overrides=[override])
    assert override.split("=")[0] in str(info.value)


def test_a_config_dataclass_is_validated_too() -> None:
    import dataclasses

    bad = dataclasses.replace(
        config.load(), federation=dataclasses.replace(config.load().federation, fraction=5.0)
    )
    with pytest.raises(ConfigError, match="fraction"):
        load_config(bad)


def test_a_config_built_in_python_is_type_checked_like_a_file() -> None:
    with pytest.raises(ConfigError, match="seed must be an integer"):
        load_config(config.Config(seed="1"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"data\.partition must be one of"):
        load_config(config.Config(data=config.DataConfig(partition="bogus")))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data must be a table"):
        load_config(config.Config(data="fashion_mnist"))  # type: ignore[arg-type]


def test_a_resolved_config_comes_back_unchanged() -> None:
    resolved = load_config(SMOKE, overrides=["federation.lr=1", "data.root=data"])
    assert load_config(resolved) == resolved


def test_data_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        CONFIGS / "smoke.toml", overrides=["data.root=data", "data.name=npz", "data.path=x.npz"]
    )
    assert cfg.data.root == str(tmp_path / "data")
    assert cfg.data.path == str(tmp_path / "x.npz")


def test_threads_and_probe_off_are_accepted_and_checked() -> None:
    cfg = load_config(CONFIGS / "smoke.toml", overrides=["threads=1", "evaluation.linear_epochs=0"])
    assert cfg.threads == 1 and cfg.evaluation.linear_epochs == 0
    assert load_config(CONFIGS / "smoke.toml").threads == 0
    with pytest.raises(ConfigError, match="threads must be >= 0"):
        load_config(CONFIGS / "smoke.toml", overrides=["threads=-1"])
    with pytest.raises(ConfigError, match="linear_epochs must be >= 0"):
        load_config(CONFIGS / "smoke.toml", overrides=["evaluation.linear_epochs=-1"])


def test_every_method_has_its_paper_protocol_configs() -> None:
    """The README's promise: the presets <name>-silo and <name>-device."""
    from fedssd.experiment import check_setup
    from fedssd.methods import METHODS

    for name in METHODS:
        for setting, clients, fraction in (("silo", 10, 1.0), ("device", 50, 0.2)):
            cfg = load_config(CONFIGS / f"{name}-{setting}.toml")
            check_setup(cfg)
            assert cfg.method.name == name and cfg.data.name == "cifar10"
            assert (cfg.federation.num_clients, cfg.federation.fraction) == (clients, fraction)


def test_image_size_resizes_folders_and_is_refused_for_a_built_in_dataset() -> None:
    for size in (32, 64, 128, 224):
        assert config.load(None, ["data.name='folder'", "data.path='x'", f"data.image_size={size}"])
    assert config.load(None, ["data.name='cifar10'", "data.image_size=32"])
    assert config.load(None, ["data.pad_to_32=false", "data.image_size=28"])
    with pytest.raises(ConfigError, match=r"cifar10's images keep their own size"):
        config.load(None, ["data.name='cifar10'", "data.image_size=224"])
