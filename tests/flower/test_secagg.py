"""Secure aggregation (Flower's SecAgg+): what it cannot run is refused before a round starts.

SecAgg+ in a real TLS deployment, matching the in-process FedAvg to its quantisation error and
surviving a dropout: tests/flower/test_deployment.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("flwr")

from test_simulation import experiment

from fedssd import api, config
from fedssd.errors import ConfigError
from fedssd.flower import secagg

__all__ = ["experiment"]  # a fixture used by name


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["method.name=ldawa"], "reads each update"),
        (["method.name=fedu2"], "reads each update"),
        (["method.name=orchestra"], "reads each update"),
        (["method.name=fedema"], "reads each update"),
        (["validation.max_norm_ratio=10"], "norm check"),
        (["faults.drop=0.1"], "simulated faults"),
        (["privacy.dp=fixed", "privacy.noise_multiplier=1"], "central differential privacy"),
        (["federation.num_clients=2"], "at least 3 clients"),
    ],
)
def test_secure_aggregation_refuses_what_needs_each_update(
    experiment: Path, sets: list[str], message: str
) -> None:
    base = ["method.name=ssd", "validation.max_norm_ratio=0"]
    cfg = config.load(experiment, [*base, *sets])
    built = api.build_experiment(cfg, log=lambda _m: None)
    with pytest.raises(ConfigError, match=message):
        secagg.check_secure_aggregation(cfg, built.method)


def test_secure_aggregation_accepts_fedavg_methods(experiment: Path) -> None:
    for name in ("ssd", "fedalignuniform", "fedsimclr", "fedbyol", "hsd"):
        cfg = config.load(experiment, [f"method.name={name}", "validation.max_norm_ratio=0"])
        built = api.build_experiment(cfg, log=lambda _m: None)
        secagg.check_secure_aggregation(cfg, built.method)
