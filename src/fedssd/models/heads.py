"""Heads on top of the encoder features."""

from __future__ import annotations

from torch import nn


def mlp_projector(in_dim: int, *, hidden_dim: int = 2048, out_dim: int = 512) -> nn.Sequential:
    """The SSD projector ``Linear -> BatchNorm1d -> ReLU -> Linear`` (Fang et al., ICCV 2025).

    Maps ``(batch, in_dim)`` features to ``(batch, out_dim)`` un-normalised embeddings.

    Args:
        in_dim: Feature dimension of the encoder.
        hidden_dim: Width of the hidden layer.
        out_dim: Embedding dimension.

    Returns:
        The projector, with PyTorch's default initialisation.
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def mlp_predictor(dim: int, *, hidden_dim: int = 2048) -> nn.Sequential:
    """The BYOL/SimSiam predictor ``Linear -> BatchNorm1d -> ReLU -> Linear`` (Grill et al. 2020).

    Maps ``(batch, dim)`` projector outputs to ``(batch, dim)`` predictions; the same shape of
    MLP as the projector, with the embedding width on both ends.

    Args:
        dim: Embedding dimension (input and output).
        hidden_dim: Width of the hidden layer (2048 in the project default).
    """
    return mlp_projector(dim, hidden_dim=hidden_dim, out_dim=dim)
