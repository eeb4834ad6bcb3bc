"""Distributed DP under SecAgg+ on Flower's simulation engine, with a client dropping out.

One simulation (3 virtual SuperNodes, one round of FedAlignUniform on 300 Fashion-MNIST images)
runs two distributed DP experiments with SecAgg+, in both of which client 2 fails in the
masked-vector stage (after the key exchange: the dropout SecAgg+ recovers from): one with
``privacy.reproducible_noise`` and one with secret noise, from the same config and seed.

- Reproducible: the released model is the global model plus (clipped updates of clients 0 and 1
  plus their regenerated noise shares) / 3, to SecAgg+'s quantisation error; the ledger records
  2 shares and the multiplier they carry.
- Secret: the server's attack (regenerate the shares from the run's config and seed, subtract
  them and the clean sum) leaves a residual of the two shares' full deviation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file
from test_simulation import EXPERIMENT

from fedssd import config
from fedssd.experiment import build_experiment
from fedssd.federation.client import local_train
from fedssd.federation.privacy import apply_mean, noised_share, share_generator
from fedssd.federation.simulator import round_lr
from fedssd.flower import secagg
from fedssd.seeding import CLIENT, generator
from flower_testing import flower_env

CLIP, Z_MIN, DROPPED = 1.0, 1.0, 2
DDP = [
    "method.name=fedalignuniform",
    "validation.max_norm_ratio=0",
    "federation.rounds=1",
    "evaluation.every=0",
    "privacy.dp=fixed",
    "privacy.mode=distributed",
    f"privacy.clip_norm={CLIP}",
    f"privacy.noise_multiplier={Z_MIN}",
    "privacy.min_replies=0.5",
]

_SIMULATION = textwrap.dedent(
    f"""
    import sys
    from pathlib import Path
    from flwr.clientapp import ClientApp
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage, Key
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from fedssd.flower.client_app import client_id_of, identify, train_client
    from fedssd.flower.secagg import secure_aggregation_mod
    from fedssd.flower.server_app import RunSettings, run_federation

    config, out, *dp = sys.argv[1:]

    def drop(msg, ctxt, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if stage == Stage.COLLECT_MASKED_VECTORS and client_id_of(ctxt) == {DROPPED}:
            raise RuntimeError("simulated dropout")
        return call_next(msg, ctxt)

    client_app = ClientApp(mods=[drop, secure_aggregation_mod])
    client_app.train()(train_client)
    client_app.query()(identify)
    server = ServerApp()

    @server.main()
    def main(grid, context):
        for name, extra in (("reproducible", ("privacy.reproducible_noise=true",)), ("secret", ())):
            settings = RunSettings(
                config=Path(config), overrides=(*dp, *extra), out=Path(out) / name,
                connect_timeout=900.0, round_timeout=900.0, secure_aggregation=True,
            )
            run_federation(grid, settings, log=print)

    run_simulation(
        server, client_app, num_supernodes=3,
        backend_config={{"client_resources": {{"num_cpus": 1}}, "init_args": {{"num_cpus": 2}}}},
    )
    """
)


def _clean_and_shares(
    cfg: config.Config, clients: list[int], std: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The global start, the sum of the clients' clipped updates (round 1 of the in-process
    simulator) and the sum of their shares regenerated from the run seed."""
    experiment = build_experiment(cfg, log=lambda _m: None)
    start = {k: v.clone() for k, v in experiment.global_model.state_dict().items()}
    settings = dataclasses.replace(experiment.settings, lr=round_lr(experiment.schedule, 0))
    keys = list(start)
    clean = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in start.items()}
    shares = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in start.items()}
    for client_id in clients:
        model = experiment.client_model
        model.load_state_dict(start)
        local_train(
            model,
            experiment.method,
            experiment.images,
            experiment.client_indices[client_id],
            settings=settings,
            generator=generator(cfg.seed, CLIENT, 0, client_id, device=experiment.images.device),
            client_id=client_id,
            position=client_id,
        )
        state = {k: v.clone() for k, v in model.state_dict().items()}
        part = noised_share(start, state, keys=keys, clip_norm=CLIP, weight=1.0, std=0, rng=None)
        alone = noised_share(
            start,
            None,
            keys=keys,
            clip_norm=CLIP,
            weight=0.0,
            std=std,
            rng=share_generator(cfg.seed, 0, client_id),
        )
        for key in keys:
            clean[key] += part[key]
            shares[key] += alone[key]
    return start, clean, shares


@pytest.mark.slow
def test_distributed_dp_under_secagg_survives_a_dropout_and_keeps_its_noise_secret(
    tmp_path: Path,
) -> None:
    experiment = tmp_path / "tiny.toml"
    experiment.write_text(EXPERIMENT)
    out = tmp_path / "flower"
    done = subprocess.run(
        [sys.executable, "-c", _SIMULATION, str(experiment), str(out), *DDP],
        env=flower_env(FLWR_HOME=str(tmp_path / "flwr-home")),
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only, as are the run's own timeouts
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distributed DP: each of the 3 clients" in done.stdout

    cohort, shares_in = 3, 2
    z_full = Z_MIN * math.sqrt(cohort / 2)  # calibrated for the fewest shares, 2 of 3
    std = z_full * CLIP / math.sqrt(cohort)
    cfg = config.load(experiment, [*DDP, "privacy.reproducible_noise=true"])
    start, clean, shares = _clean_and_shares(cfg, [0, 1], std)
    # SecAgg+'s quantisation: each of the 2 entries summed moves by at most 2c / Q.
    step = 2 * (CLIP + 10 * std) / secagg.quantization_levels(cohort)
    floating = [k for k, v in start.items() if v.is_floating_point()]

    # Reproducible noise: the released model is the start plus (clean + shares) / 3.
    expected = apply_mean(start, {k: clean[k] + shares[k] for k in floating}, cohort)
    got = load_file(str(out / "reproducible" / "model.safetensors"))
    for key in floating:
        bound = shares_in * step / cohort + 1e-5 * (1 + float(expected[key].abs().max()))
        error = float((got[key] - expected[key]).abs().max())
        assert error <= bound, (key, error, bound)
    for key in set(start) - set(floating):
        assert torch.equal(got[key], start[key]), key  # integer counters stay the server's
    (record,) = [
        json.loads(line)
        for line in (out / "reproducible" / "metrics.jsonl").read_text().splitlines()
    ]
    assert record["dp_mode"] == "distributed" and record["dp_noise_shares"] == shares_in
    assert record["dp_noise_multiplier"] == pytest.approx(Z_MIN)  # z_full sqrt(2 / 3)
    assert record["dp_share_std"] == pytest.approx(std)
    assert "clients" not in record and "loss" not in record
    # The server's own log: the dropout, and no client's loss or size (never sent under DP).
    (kept,) = [
        json.loads(line)
        for line in (out / "secret" / "server_only" / "rounds.jsonl").read_text().splitlines()
    ]
    assert kept["failed"] == {str(DROPPED): "dropped out of secure aggregation"}
    assert kept["loss"] is None and kept["samples"] == {}

    # Secret noise: the server knows the config and the seed, regenerates the shares and
    # subtracts them and the clean sum: the noise is still all there.
    secret = load_file(str(out / "secret" / "model.safetensors"))
    left = torch.cat(
        [
            ((secret[k].double() - start[k].double()) * cohort - clean[k] - shares[k]).flatten()
            for k in floating
            if not k.endswith("running_var")  # clamped at 0 after the noise
        ]
    )
    assert float(left.std()) == pytest.approx(math.sqrt(2 * shares_in) * std, rel=0.1)
    summary = json.loads((out / "secret" / "summary.json").read_text())
    assert summary["dp_private"] is True and summary["dp_mode"] == "distributed"
    # Every client every round: the server knows nothing the sampling would have hidden.
    assert summary["dp_server_epsilon"] == pytest.approx(summary["dp_epsilon"])
    assert summary["dp_epsilon"] == pytest.approx(record["dp_epsilon"])
    assert 0 < summary["dp_range_delta"] < 1e-15
