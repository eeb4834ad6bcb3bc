"""User-facing errors.

Every error a user can cause (a bad config, missing or malformed data, a wrong checkpoint) is raised
as a :class:`FedSSDError` whose message is one sentence saying what is wrong and what to do. The
CLI prints that sentence and exits with code 2 (1 for :class:`TrainingDiverged`, a run that
failed rather than a bad input); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedSSDError(Exception):
    """An error caused by the user's input, reported as one sentence."""


class ConfigError(FedSSDError):
    """A configuration file, override or argument is invalid."""


class DataError(FedSSDError):
    """A dataset or split file is missing, corrupt or inconsistent."""


class TrainingDiverged(FedSSDError):
    """Training cannot go on: every client's loss diverged, or aggregation gave NaN weights."""
