"""Simulated client failures, drawn from the run seed (so a resumed run sees the same ones)."""

from __future__ import annotations

from typing import Literal

from fedssd.config import FaultConfig
from fedssd.seeding import FAULTS, numpy_rng

Fault = Literal["crash", "straggle", "drop"]


def draw_fault(
    settings: FaultConfig, *, seed: int, round_index: int, client_id: int
) -> Fault | None:
    """The failure (if any) of ``client_id`` in round ``round_index``.

    One uniform number per (round, client) decides: below ``crash`` the client crashes before
    training; below ``crash + straggle`` it trains but misses the deadline; below
    ``crash + straggle + drop`` its update is lost on the way; otherwise it succeeds. Each
    probability is therefore exact when their sum is at most 1 (larger sums saturate in that order).
    """
    if settings.crash == settings.straggle == settings.drop == 0:
        return None
    u = float(numpy_rng(seed, FAULTS, round_index, client_id).random())
    if u < settings.crash:
        return "crash"
    if u < settings.crash + settings.straggle:
        return "straggle"
    if u < settings.crash + settings.straggle + settings.drop:
        return "drop"
    return None
