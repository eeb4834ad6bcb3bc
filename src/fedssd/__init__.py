"""fedssd: federated unsupervised representation learning with SSD and its baselines.

The one call to run an experiment is :func:`fedssd.train`; see its docstring and the README.

Public names:
    train: Run one experiment and write its run folder.
    resume: Continue (or extend) a run from its newest checkpoint.
    load_config: A validated, resolved :class:`Config` from a TOML file and overrides.
    load_run: The config and trained model of a finished run folder.
    load_encoder: A trained encoder (a run folder or an exported file), ready in eval mode.
    Config: The experiment configuration (a frozen dataclass).
    RunResult: What :func:`train` returns.

The heavy modules load on first use, so ``import fedssd`` stays cheap. Importing fedssd sets
OpenMP's wait policy for PyTorch's CPU threads unless the environment already chooses one
(:mod:`fedssd.openmp`): it must happen before PyTorch loads, and every entry point imports this
package first.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fedssd.openmp import apply_defaults
from fedssd.version import __version__

apply_defaults(os.environ)

if TYPE_CHECKING:
    from fedssd.api import resume, train
    from fedssd.config import Config
    from fedssd.encoders import load_encoder
    from fedssd.experiment import RunResult
    from fedssd.runs.model import load_run
    from fedssd.runs.resolve import load_config

__all__ = [
    "Config",
    "RunResult",
    "__version__",
    "load_config",
    "load_encoder",
    "load_run",
    "resume",
    "train",
]

# Where each lazily loaded public name lives.
_LAZY = {
    "RunResult": "fedssd.experiment",
    "load_config": "fedssd.runs.resolve",
    "resume": "fedssd.api",
    "train": "fedssd.api",
    "Config": "fedssd.config",
    "load_encoder": "fedssd.encoders",
    "load_run": "fedssd.runs.model",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedssd' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    # dir() and help() list the lazy names too, not only what has been imported so far.
    return sorted({*globals(), *__all__})
