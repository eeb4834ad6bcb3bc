"""fedssd: federated unsupervised representation learning with SSD and its baselines.

The one call to run an experiment is :func:`fedssd.train`; see its docstring and the README.
The heavy modules load on first use, so ``import fedssd`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fedssd.api import RunResult, load_config, resume, train
    from fedssd.config import Config
    from fedssd.encoders import load_encoder

__all__ = ["Config", "RunResult", "__version__", "load_config", "load_encoder", "resume", "train"]


def __getattr__(name: str) -> Any:
    if name in ("RunResult", "load_config", "resume", "train"):
        from fedssd import api

        return getattr(api, name)
    if name == "load_encoder":
        from fedssd.encoders import load_encoder

        return load_encoder
    if name == "Config":
        from fedssd.config import Config

        return Config
    raise AttributeError(f"module 'fedssd' has no attribute {name!r}")
