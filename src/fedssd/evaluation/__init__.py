"""Evaluation of learned representations: features, kNN monitor, linear probe and metrics."""

from __future__ import annotations

from fedssd.evaluation.features import extract_features
from fedssd.evaluation.knn import knn_accuracy, knn_predict
from fedssd.evaluation.linear_probe import LinearProbeResult, linear_probe
from fedssd.evaluation.metrics import (
    alignment_loss,
    cross_uniformity_loss,
    effective_rank,
    representation_metrics,
    uniformity_loss,
)

__all__ = [
    "LinearProbeResult",
    "alignment_loss",
    "cross_uniformity_loss",
    "effective_rank",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
    "representation_metrics",
    "uniformity_loss",
]
