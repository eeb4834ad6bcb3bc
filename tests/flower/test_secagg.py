"""Issue 14: secure aggregation (Flower's SecAgg+) in a real TLS deployment.

A SuperLink and 3 SuperNodes on 127.0.0.1 with TLS and SuperNode authentication (the helpers of
test_flower.py), ``flwr run`` with ``secure-aggregation = true``: (1) the global weights equal the
in-process simulator's to within SecAgg+'s quantisation error; (2) with one node dropping out in
the masked-vector stage, the round completes and the weights are the FedAvg of the other two
clients' updates. Refusals of what SecAgg+ cannot run are checked without Flower.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file
from test_simulation import experiment

from fedssd import api, config
from fedssd.aggregate import fedavg
from fedssd.data.federated import prepare_data
from fedssd.errors import ConfigError
from fedssd.experiment import build_experiment
from fedssd.federation.client import local_train
from fedssd.federation.simulator import round_lr
from fedssd.flower import secagg
from fedssd.seeding import CLIENT, generator
from flower_testing import (  # the deployment helpers (pytest puts tests/ on sys.path)
    BIN,
    FLOWER_APP,
    REPO,
    Processes,
    flower_env,
    flwr_home,
    free_port,
    start_superlink,
    write_node_key,
    write_tls,
)

__all__ = ["experiment"]  # a fixture used by name

# What SecAgg+ needs: a FedAvg method and no per-update norm check; one round, so that the
# quantisation error is not amplified by further training.
SETS = ["method.name=fedalignuniform", "validation.max_norm_ratio=0", "federation.rounds=1"]

# A ClientApp that is fedssd's, plus a mod that makes the node named in the run config fail in
# SecAgg+'s masked-vector stage (after the key exchange: the dropout the protocol recovers from).
_DROPOUT_APP = textwrap.dedent(
    """
    from flwr.clientapp import ClientApp
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from fedssd.flower.client_app import client_id_of, identify, train_client
    from fedssd.flower.secagg import secure_aggregation_mod


    def drop(msg, ctxt, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        victim = int(ctxt.run_config.get("test-drop-client", -1))
        if stage == Stage.COLLECT_MASKED_VECTORS and client_id_of(ctxt) == victim:
            raise RuntimeError("simulated dropout")
        return call_next(msg, ctxt)


    app = ClientApp(mods=[drop, secure_aggregation_mod])
    app.train()(train_client)
    app.query()(identify)
    """
)


def _flower_app(folder: Path) -> Path:
    """The repository's Flower App with the dropout ClientApp above."""
    folder.mkdir()
    text = (FLOWER_APP / "pyproject.toml").read_text()
    text = text.replace('clientapp = "fedssd.flower.client_app:app"', 'clientapp = "dropout:app"')
    assert 'clientapp = "dropout:app"' in text
    (folder / "pyproject.toml").write_text(text + "test-drop-client = -1\n")
    (folder / "fedssd.toml").write_text((FLOWER_APP / "fedssd.toml").read_text())
    (folder / "dropout.py").write_text(_DROPOUT_APP)
    return folder


def _quantisation_tolerance(cfg: config.Config, sizes: list[int], weights: list[int]) -> float:
    """SecAgg+'s bound on one entry of the mean: each client's scaled entry is stochastically
    rounded to a step of 2c / Q, so the mean is off by at most n * (2c / Q) / sum(w / max_w)."""
    max_weight = secagg.max_batches(cfg, sizes)
    step = 2 * secagg.CLIPPING_RANGE / secagg.QUANTIZATION_RANGE
    return len(weights) * step / sum(w / max_weight for w in weights)


def _fedavg_of(cfg: config.Config, clients: list[int]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Round 1 of the in-process simulator restricted to ``clients`` (what the server should
    get when the others drop out), and their weights."""
    experiment = build_experiment(cfg, log=lambda _m: None)
    start = {k: v.clone() for k, v in experiment.global_model.state_dict().items()}
    settings = dataclasses.replace(experiment.settings, lr=round_lr(experiment.schedule, 0))
    states, weights = [], []
    for client_id in clients:
        model = experiment.client_model
        model.load_state_dict(start)
        result = local_train(
            model,
            experiment.method,
            experiment.images,
            experiment.client_indices[client_id],
            settings=settings,
            generator=generator(cfg.seed, CLIENT, 0, client_id, device=experiment.images.device),
            client_id=client_id,
            position=client_id,  # every client is sampled: position = id
        )
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        weights.append(result.num_batches)
    return fedavg(states, [float(w) for w in weights]), weights


def _assert_close(expected: dict[str, torch.Tensor], path: Path, tolerance: float) -> None:
    got = load_file(str(path))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if value.is_floating_point():
            # float32 storage of the result adds a rounding of its own.
            bound = tolerance + 2 * float(value.abs().max()) * 2**-24
            error = float((got[key].double() - value.double()).abs().max())
            assert error <= bound, (key, error, bound)
        else:
            assert torch.equal(got[key], value), key


@pytest.mark.slow
def test_secure_aggregation_deployment_matches_and_survives_a_dropout(
    tmp_path: Path, experiment: Path, processes: Processes
) -> None:
    cfg = config.load(experiment, SETS)
    sizes = [len(p) for p in prepare_data(cfg, log=lambda _m: None).client_indices]
    expected_all, weights_all = _fedavg_of(cfg, [0, 1, 2])
    expected_two, weights_two = _fedavg_of(cfg, [0, 1])
    # The in-process simulator agrees with the hand-made round (so the comparison is fair).
    plain = api.train(experiment, overrides=SETS, log=None).model.state_dict()
    for key, value in expected_all.items():
        torch.testing.assert_close(plain[key], value, rtol=0, atol=1e-6)

    write_tls(tmp_path)
    for name in ("node0", "node1", "node2"):
        write_node_key(tmp_path / name)
    home, port = flwr_home(tmp_path)
    env = flower_env(FLWR_HOME=str(home), PYTHONPATH=str(REPO / "src"))
    ca = str(tmp_path / "ca.crt")
    start_superlink(processes, tmp_path, port, env, register=["node0", "node1", "node2"])
    for k in range(3):
        processes.start(
            f"supernode{k}",
            [
                str(BIN / "flower-supernode"),
                "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", ca,
                "--auth-supernode-private-key", str(tmp_path / f"node{k}"),
                "--node-config", f"partition-id={k} num-partitions=3",
                "--port", str(free_port()),
            ],
            env,
        )  # fmt: skip
    app = _flower_app(tmp_path / "app")

    def run(name: str, drop: int, client_metrics: bool) -> Path:
        out = tmp_path / name
        run_config = (
            f'config="{experiment}" out="{out}" overrides="{" ".join(SETS)}" '
            f"secure-aggregation=true test-drop-client={drop} "
            f"secagg-client-metrics={str(client_metrics).lower()}"
        )
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "test", "--stream", "--run-config", run_config],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        deadline = time.monotonic() + 60
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (out / "summary.json").exists(), done.stdout[-3000:] + processes.log("superlink")
        return out

    # (1) Every node answers: FedAvg of all three, to the quantisation tolerance. The clients
    # send no loss and no batch count in the clear (the default).
    out = run("secure", drop=-1, client_metrics=False)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["secure_aggregation"] is True
    assert record["accepted"] == 3 and record["failed"] == {}
    assert record["loss"] is None and record["samples"] == {}
    tolerance = _quantisation_tolerance(cfg, sizes, weights_all)
    assert tolerance < 1e-5  # 3 clients, c = 8, Q = 2^22: a few 1e-6
    _assert_close(expected_all, out / "model.safetensors", tolerance)

    # (2) Client 2 drops out after the key exchange: the others' shares unmask the sum of 0 and 1.
    # Here the run config asks the clients for their loss and batch count.
    out = run("dropout", drop=2, client_metrics=True)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["accepted"] == 2
    assert record["failed"] == {"2": "dropped out of secure aggregation"}
    assert math.isfinite(record["loss"]) and sorted(record["samples"]) == ["0", "1"]
    _assert_close(
        expected_two, out / "model.safetensors", _quantisation_tolerance(cfg, sizes, weights_two)
    )
    assert not math.isclose(
        float(load_file(str(out / "model.safetensors"))["projector.0.weight"].sum()),
        float(expected_all["projector.0.weight"].sum()),
    )


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
