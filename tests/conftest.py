"""Settings shared by every test."""

from __future__ import annotations

import torch

# One intra-op thread in the test process, as in the subprocesses the tests start (their
# OMP_NUM_THREADS=1): CPU results depend on the thread count, and several tests compare a run in
# this process with one in a subprocess bit for bit. Pinned here, the outcome no longer depends on
# which tests ran earlier or on how many cores the machine has.
torch.set_num_threads(1)
