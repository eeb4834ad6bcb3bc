"""Settings shared by every test."""

from __future__ import annotations

import pytest
import torch

# One intra-op thread in the test process, as in the subprocesses the tests start (their
# OMP_NUM_THREADS=1): CPU results depend on the thread count, and several tests compare a run in
# this process with one in a subprocess bit for bit. Pinned here, the outcome no longer depends on
# which tests ran earlier or on how many cores the machine has.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first, so that under pytest-xdist (``make test``) no long test starts last: the
    Flower deployments (the longest modules, about 6 minutes each alone) on workers of their
    own from the start, then the modules with a test marked slow, then the rest. A module's
    tests stay together and in their order, so that its module-scoped fixtures are built once."""

    def rank(item: pytest.Item) -> int:
        if item.nodeid.startswith("tests/flower/test_deployment"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    modules: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        modules[module] = min(modules.get(module, 2), rank(item))
    items.sort(key=lambda item: modules[item.nodeid.split("::")[0]])
