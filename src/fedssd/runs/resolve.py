"""A run's config, validated and resolved: method options complete, data paths absolute.

:func:`load_config` is what every entry point (``fedssd.train``, the CLI, a sweep, a Flower
server or node) turns a file, a preset or a dataclass into; a resolved config is what a run
folder's ``config.toml`` holds, so it reruns from any folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from fedssd import config as config_module
from fedssd import presets
from fedssd.config import Config
from fedssd.data.federated import named_dataset
from fedssd.methods import option_dict


def resolve(config: Config) -> Config:
    """``config`` with the method's options complete and data paths absolute.

    Raises:
        ConfigError: The method or an option is unknown or out of range.
    """
    options = option_dict(config.method.name, config.method.options)
    data = config.data
    data = dataclasses.replace(
        data,
        path=_absolute(data.path),
        root=_absolute(data.root),
        split_file=_absolute(
            None if data.split_file is None else presets.split_path(data.split_file)
        ),
        clients=tuple(str(_absolute(site)) for site in data.clients),
    )
    evaluation = config.evaluation
    if evaluation.data is not None and not named_dataset(evaluation.data):
        evaluation = dataclasses.replace(evaluation, data=_absolute(evaluation.data))
    model = config.model
    if model.init_from is not None:
        model = dataclasses.replace(model, init_from=_absolute(model.init_from))
    return dataclasses.replace(
        config,
        data=data,
        evaluation=evaluation,
        model=model,
        method=dataclasses.replace(config.method, options=options),
    )


def _absolute(path: str | None) -> str | None:
    """A path made absolute, so that the saved config reruns from any folder."""
    return None if path is None else str(Path(path).expanduser().resolve())


def load_config(config: Config | str | Path, *, overrides: Sequence[str] = ()) -> Config:
    """A validated, resolved :class:`Config` from a dataclass or a TOML path, with overrides.

    A file is read and parsed once; a :class:`Config` without overrides is checked and
    resolved as it is (a resolved config comes back unchanged).

    Args:
        config: A :class:`~fedssd.config.Config`, the path of a TOML file, or a preset's name
            (``demo``, ``paper/cifar10-silo-ssd``; ``fedssd configs`` lists them).
        overrides: ``dotted.key=value`` strings applied on top (e.g. ``"federation.rounds=5"``).

    Raises:
        fedssd.errors.ConfigError: The file is missing or a key is unknown, mistyped or out of
            range, in one sentence.
    """
    if isinstance(config, Config) and not overrides:
        config_module.check(config)
        return resolve(config)
    source = (
        config_module.to_dict(config) if isinstance(config, Config) else presets.config_path(config)
    )
    return resolve(config_module.load(source, overrides))
