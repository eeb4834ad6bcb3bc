"""Plain helpers several test files share (importable because ``tests/`` is on ``sys.path``)."""

from __future__ import annotations

import torch

from fedssd.methods import MethodContext


def method_context(
    num_clients: int = 4, feature_dim: int = 16, embed_dim: int = 16, seed: int = 0
) -> MethodContext:
    """The :class:`MethodContext` of a CPU run with the given sizes."""
    return MethodContext(
        num_clients=num_clients,
        feature_dim=feature_dim,
        embed_dim=embed_dim,
        seed=seed,
        device=torch.device("cpu"),
    )


def one_sentence(message: str) -> bool:
    """Whether an error message is one sentence: a full stop at the end, none inside, one line."""
    return message.endswith(".") and ". " not in message and "\n" not in message
