"""Secure aggregation (Flower's SecAgg+): what it cannot run is refused before a round starts.

SecAgg+ in a real TLS deployment, matching the in-process FedAvg to its quantisation error and
surviving a dropout: tests/flower/test_deployment_recovery.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from test_simulation import experiment

from fedssd import config
from fedssd.errors import ConfigError
from fedssd.experiment import build_experiment
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
        (["federation.sampling=poisson", "federation.fraction=0.5"], "Poisson sampling"),
    ],
)
def test_secure_aggregation_refuses_what_needs_each_update(
    experiment: Path, sets: list[str], message: str
) -> None:
    base = ["method.name=ssd", "validation.max_norm_ratio=0"]
    cfg = config.load(experiment, [*base, *sets])
    built = build_experiment(cfg, log=lambda _m: None)
    with pytest.raises(ConfigError, match=message):
        secagg.check_secure_aggregation(cfg, built.method)


def test_secure_aggregation_accepts_fedavg_methods(experiment: Path) -> None:
    for name in ("ssd", "fedalignuniform", "fedsimclr", "fedbyol", "hsd"):
        cfg = config.load(experiment, [f"method.name={name}", "validation.max_norm_ratio=0"])
        built = build_experiment(cfg, log=lambda _m: None)
        secagg.check_secure_aggregation(cfg, built.method)


def test_the_quantised_sum_never_wraps_the_modulus() -> None:
    """Each client's entries are quantised to [0, Q]; SecAgg+ adds them modulo 2^32. With
    Q = 2^22, 1,100 clients at the top of the range would wrap (the sum would come back small);
    the levels are lowered for such a cohort so that it cannot."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    assert secagg.quantization_levels(3) == secagg.quantization_levels(1023) == 2**22
    for cohort in (3, 1023, 1024, 1100, 10_000, 100_000):
        levels = secagg.quantization_levels(cohort)
        assert cohort * levels < secagg.MODULUS_RANGE
        # Lowered no further than needed.
        assert levels == 2**22 or cohort * (levels + 1) >= secagg.MODULUS_RANGE
    cohort, c = 1100, 8.0
    top = [np.full(4, c)]

    def unmasked_mean(levels: int) -> float:
        total = sum(quantize(top, c, levels)[0].astype(np.int64) for _ in range(cohort))
        wrapped = np.mod(total, secagg.MODULUS_RANGE)
        # Flower's dequantisation of a sum of ``cohort`` shifted entries.
        value = dequantize([wrapped], c, levels)[0] - (cohort - 1) * c
        return float(value[0]) / cohort

    assert unmasked_mean(2**22) < 0  # wrapped: the mean of +8s comes back negative
    assert unmasked_mean(secagg.quantization_levels(cohort)) == pytest.approx(c, abs=1e-3)


def test_a_client_sends_no_loss_or_batch_count_unless_asked() -> None:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([np.zeros(2)]),
        num_examples=7,
        metrics={"client-id": 1, "num-batches": 7, "loss": 0.5, "secagg-clipped": False},
    )
    content = compat.fitres_to_recorddict(fitres, keep_input=True)
    secagg._withhold_metrics(content)
    back = compat.recorddict_to_fitres(content, keep_input=True)
    assert back.num_examples == 0 and back.metrics == {"secagg-clipped": False}
