"""Derived random streams: one run seed, and an independent stream for every (purpose, ...) key.

Nothing in a run uses the global random state. A client's batches and augmentations in a round come
from ``SeedSequence([seed, CLIENT, round, client_id])``, so they do not depend on which other
clients were sampled, and the in-process and Flower runs can match exactly.
"""

from __future__ import annotations

import numpy as np
import torch

# Purposes, mixed into the seed sequence so that streams never coincide.
MODEL_INIT = 1
SAMPLING = 2
CLIENT = 3
EVALUATION = 4
SUBSET = 5
FAULTS = 6
EXTRAS_INIT = 7
PARTITION = 0x50415254  # "PART"
SCALING_SETS = 0x55D
SAMPLE_ORDER = 8


def derive_seed(seed: int, *key: int) -> int:
    """A 63-bit seed derived from the run seed and a key (a purpose tag and indices)."""
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator(seed: int, *key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from the run seed and a key."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *key))
    return gen


def numpy_rng(seed: int, *key: int) -> np.random.Generator:
    """A numpy generator seeded from the run seed and a key."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))
