"""What a deployment of docs/deployment.md survives: the coordinator dying, and SecAgg+ with and
without distributed DP, each with a site dropping out.

The module's deployment is the page's, run up to its "Run" (:mod:`deployment_testing`): the sites,
certificates, keys, the SuperLink, the SuperNodes and the App, without the page's own run, which
test_deployment.py makes on a deployment of its own (the two run side by side under
pytest-xdist). The tests share this SuperLink and these SuperNodes:

1. the coordinator dies after round 1 of 2 (the SuperLink and the ServerApp, SIGKILL): the
   SuperLink started again by the page's systemd unit (its full path, the unit's PATH,
   ``--database``) keeps the SuperNodes, which come back without registering again, and the
   resumed run ends with the in-process simulator's weights;
2. SecAgg+, a site dropping out after the key exchange: FedAvg of the other two, to SecAgg+'s
   quantisation error;
3. distributed DP under SecAgg+, a site dropping out: the ledger counts the shares that
   arrived, nothing per-site is released, and the model carries the shares' noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file

from deployment_testing import (
    Deployment,
    alive,
    assert_same_weights,
    hook_env,
    hooks_app,
    in_process,
    records,
    running,
    wait_for,
)
from fedssd import config
from fedssd.aggregate import fedavg
from fedssd.experiment import build_experiment
from fedssd.federation.client import local_train
from fedssd.federation.simulator import round_lr
from fedssd.flower import secagg
from fedssd.seeding import CLIENT, generator


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with running(tmp_path_factory.mktemp("deployment"), until="8. Run") as running_:
        yield running_


@pytest.mark.slow
def test_the_coordinator_dies_and_the_run_resumes_exactly(
    deployment: Deployment, tmp_path: Path
) -> None:
    folder = deployment.folder
    experiment = deployment.experiment("coordinator-dies", "fedema", rounds=2)
    out = folder / "coordinator" / "runs" / "coordinator-dies"
    pidfile = tmp_path / "superlink.pid"
    pidfile.write_text(str(deployment.superlink))
    crashed = deployment.submit(
        hooks_app(deployment), config=str(experiment), out=str(out),
        test_crash_round=1, test_crash_pidfile=str(pidfile),
    )  # fmt: skip
    wait_for(lambda: not alive(deployment.superlink), "the SuperLink to die")
    assert [r["round"] for r in records(out / "metrics.jsonl")] == [1]
    # The page's unit starts it again: by its full path, with the unit's PATH and --database.
    command, unit_env = deployment.unit("fedssd-superlink")
    superlink = deployment.start(
        "superlink-restarted", command, {**unit_env, **hook_env(deployment)}
    )
    deployment.superlink = superlink.pid
    # The SuperNodes waited, and come back without being registered again.
    wait_for(
        lambda: superlink.poll() is not None or deployment.node_statuses() == ["online"] * 3,
        "the SuperNodes back online",
        poll=2.0,
    )
    assert superlink.poll() is None, deployment.processes.log("superlink-restarted")
    assert all(alive(pid) for pid in deployment.nodes.values())
    resumed = deployment.stream(
        folder / "coordinator" / "flower_app", resume=True, out=str(out)
    ).stdout
    assert "Flower's [ROUND 1] of this resumed run is round 2/2 of the fedssd run" in resumed
    assert (out / "summary.json").exists(), resumed[-3000:]
    assert [r["round"] for r in records(out / "metrics.jsonl")] == [1, 2]
    assert_same_weights(
        in_process(deployment, experiment, tmp_path / "in-process"), out / "model.safetensors"
    )
    # The run that died is not reported as finished well.
    status, _ = deployment.status(crashed)
    assert status != "finished:completed", status


def _fedavg_of(
    cfg: config.Config, clients: list[int], start: dict[str, torch.Tensor], round_index: int
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Round ``round_index`` of the in-process simulator from ``start``, restricted to
    ``clients``, and their weights (numbers of batches)."""
    experiment = build_experiment(cfg, log=lambda _m: None)
    settings = dataclasses.replace(
        experiment.settings, lr=round_lr(experiment.schedule, round_index)
    )
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
            generator=generator(
                cfg.seed, CLIENT, round_index, client_id, device=experiment.images.device
            ),
            client_id=client_id,
            position=client_id,  # every client is sampled, in id order
        )
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        weights.append(result.num_batches)
    return fedavg(states, [float(w) for w in weights]), weights


def _assert_within(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], bound: float
) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if value.is_floating_point():
            # float32 storage of the result adds a rounding of its own.
            limit = bound + 2 * float(value.abs().max()) * 2**-24
            error = float((got[key].double() - value.double()).abs().max())
            assert error <= limit, (key, error, limit)
        else:
            assert torch.equal(got[key], value), key


# The sites' photo updates leave SecAgg+'s default range [-8, 8]; the run config widens it.
CLIPPING_RANGE = 64.0


def _quantisation_bound(cfg: config.Config, sizes: list[int], weights: list[int]) -> float:
    """SecAgg+'s bound on one entry of the mean: each client's scaled entry is stochastically
    rounded to a step of 2c / Q, so the mean is off by at most n * (2c / Q) / sum(w / max_w)."""
    max_weight = secagg.max_batches(cfg, sizes)
    step = 2 * CLIPPING_RANGE / secagg.QUANTIZATION_RANGE
    return len(weights) * step / sum(w / max_weight for w in weights)


@pytest.mark.slow
def test_secure_aggregation_survives_a_site_dropping_out(deployment: Deployment) -> None:
    """One round of SecAgg+ in which site C drops out after the key exchange: the others'
    shares unmask the sum of sites A and B, FedAvg of the two to SecAgg+'s quantisation error,
    not of the three."""
    folder = deployment.folder
    experiment = deployment.experiment("secure", "fedalignuniform", rounds=1)
    sets = ["validation.max_norm_ratio=0"]
    out = folder / "coordinator" / "runs" / "secure"
    done = deployment.stream(
        hooks_app(deployment), config=str(experiment), out=str(out), overrides=" ".join(sets),
        secure_aggregation=True, secagg_clipping_range=CLIPPING_RANGE, test_drop_client=2,
        test_drop_round=1,
    )  # fmt: skip
    assert (out / "summary.json").exists(), done.stdout[-3000:]
    (record,) = records(out / "metrics.jsonl")
    assert record["secure_aggregation"] is True
    assert record["accepted"] == 2
    assert record["failed"] == {"2": "dropped out of secure aggregation"}
    cfg = config.load(experiment, [*sets, deployment.sites()])
    sizes = [300, 300, 300]
    initial = build_experiment(cfg, log=lambda _m: None).global_model.state_dict()
    expected, weights = _fedavg_of(cfg, [0, 1], initial, 0)
    bound = _quantisation_bound(cfg, sizes, weights)
    assert bound < 1e-4  # 2 of 3 clients, c = 64, Q = 2^22: a few 1e-5
    final = load_file(str(out / "model.safetensors"))
    _assert_within(expected, final, bound)
    with_all, _ = _fedavg_of(cfg, [0, 1, 2], initial, 0)
    assert not math.isclose(
        float(final["projector.0.weight"].sum()), float(with_all["projector.0.weight"].sum())
    )


@pytest.mark.slow
def test_distributed_dp_under_secagg_noises_every_share_on_the_sites(
    deployment: Deployment,
) -> None:
    """Distributed DP over the deployment: each site clips its update and adds its secret share
    of the noise before masking; a site drops out, the round is accounted with the shares that
    arrived, and nothing per-site leaves in the clear."""
    folder = deployment.folder
    experiment = deployment.experiment("distributed-dp", "fedalignuniform", rounds=1)
    clip, z_min, cohort, shares_in = 1.0, 1.0, 3, 2
    sets = [
        "validation.max_norm_ratio=0", "evaluation.every=0", "privacy.dp=fixed",
        "privacy.mode=distributed", f"privacy.clip_norm={clip}",
        f"privacy.noise_multiplier={z_min}", "privacy.min_replies=0.5",
    ]  # fmt: skip
    out = folder / "coordinator" / "runs" / "distributed-dp"
    done = deployment.stream(
        hooks_app(deployment), config=str(experiment), out=str(out), overrides=" ".join(sets),
        secure_aggregation=True, test_drop_client=2, test_drop_round=1,
    )  # fmt: skip
    assert (out / "summary.json").exists(), done.stdout[-3000:]
    (record,) = records(out / "metrics.jsonl")
    assert record["dp_mode"] == "distributed" and record["dp_noise_shares"] == shares_in
    # Each share carries z_min sqrt(n / r_min) C / sqrt(n) (r_min = 2 of 3): two of them carry
    # the planned z_min.
    share_std = z_min * math.sqrt(cohort / 2) * clip / math.sqrt(cohort)
    assert record["dp_share_std"] == pytest.approx(share_std)
    assert record["dp_noise_multiplier"] == pytest.approx(z_min)
    assert not {"clients", "loss", "samples", "failed"} & set(record), record
    # The released model moved by the two shares' noise: (model - start) * n is the two
    # clipped updates (norm at most 2C) plus noise of deviation sqrt(2) * share_std per entry.
    cfg = config.load(experiment, [*sets, deployment.sites()])
    start = build_experiment(cfg, log=lambda _m: None).global_model.state_dict()
    final = load_file(str(out / "model.safetensors"))
    moved = torch.cat(
        [
            ((final[k].double() - start[k].double()) * cohort).flatten()
            for k, v in start.items()
            if v.is_floating_point() and not k.endswith("running_var")  # clamped at 0
        ]
    )
    noise = math.sqrt(shares_in) * share_std
    rms = float(moved.pow(2).mean().sqrt())
    assert 0.85 * noise <= rms <= 1.15 * noise + 2 * clip / math.sqrt(moved.numel()), (rms, noise)
