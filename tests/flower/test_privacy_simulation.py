"""DP-FedAvg on Flower: the same mechanism, secret and fresh noise, the ledger recorded.

One simulation on Flower's engine (3 virtual SuperNodes, 2 rounds of FedAlignUniform on 300
Fashion-MNIST images) runs three DP experiments: one with ``privacy.reproducible_noise`` (which
must then equal the in-process simulator's run, ledger included) and two with secret noise from the
same config and seed (which must differ from each other and from the reproducible one). The
server records every message it sends, so the test can check that the secret never reaches a
client, and that no file of the run holds it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from safetensors.torch import load_file
from test_simulation import EXPERIMENT

from fedssd.api import train
from fedssd.federation.accounting import ledger
from fedssd.runs.checkpoint import list_checkpoints, load_checkpoint
from fedssd.runs.outputs import SERVER_ONLY_LOG
from flower_testing import flower_env

DP = [
    "method.name=fedalignuniform",
    "evaluation.every=0",
    "privacy.dp=fixed",
    "privacy.clip_norm=1.0",
    "privacy.noise_multiplier=1.0",
]
# A secret the server process draws for the second run (the third draws a real one).
KNOWN_SECRET = (1 << 255) | 0x5EC12E7_0DD_C0FFEE

_SIMULATION = textwrap.dedent(
    """
    import secrets, sys
    from pathlib import Path
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation
    from fedssd.flower.client_app import app as client_app
    from fedssd.flower.server_app import RunSettings, run_federation

    config, out, known, *dp = sys.argv[1:]
    server = ServerApp()
    real = secrets.randbits

    @server.main()
    def main(grid, context):
        sent = []
        send = grid.send_and_receive

        def recording(messages, *args, **kwargs):
            messages = list(messages)
            for message in messages:
                for record in message.content.config_records.values():
                    sent.append(repr(dict(record)))
            return send(messages, *args, **kwargs)

        grid.send_and_receive = recording
        runs = [("reproducible", ("privacy.reproducible_noise=true",), real),
                ("secret", (), lambda bits: int(known)), ("again", (), real)]
        for name, extra, draw in runs:
            secrets.randbits = draw
            settings = RunSettings(
                config=Path(config), overrides=(*dp, *extra), out=Path(out) / name,
                connect_timeout=900.0, round_timeout=900.0,
            )
            run_federation(grid, settings, log=print)
        secrets.randbits = real
        (Path(out) / "sent.txt").write_text("\\n".join(sent))

    run_simulation(
        server, client_app, num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 2}, "init_args": {"num_cpus": 2}},
    )
    """
)


def _records(run: Path, name: str = "metrics.jsonl") -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


@pytest.mark.slow
def test_dp_on_flower_has_secret_fresh_noise_and_records_the_ledger(tmp_path: Path) -> None:
    experiment = tmp_path / "tiny.toml"
    experiment.write_text(EXPERIMENT)
    out = tmp_path / "flower"
    done = subprocess.run(
        [sys.executable, "-c", _SIMULATION, str(experiment), str(out), str(KNOWN_SECRET), *DP],
        env=flower_env(FLWR_HOME=str(tmp_path / "flwr-home")),
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only, as are the run's own timeouts
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Reproducible noise: the same run as the in-process simulator's, ledger and all.
    local = train(
        experiment,
        overrides=[*DP, "privacy.reproducible_noise=true"],
        out=tmp_path / "local",
        log=None,
    )
    reproducible = load_file(str(out / "reproducible" / "model.safetensors"))
    for key, value in local.model.state_dict().items():
        torch.testing.assert_close(reproducible[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert ledger(_records(out / "reproducible")) == ledger(_records(tmp_path / "local"))
    assert json.loads((out / "reproducible" / "summary.json").read_text())["dp_private"] is False

    # Secret noise: every round's charge in metrics.jsonl and the checkpoint, nothing per client.
    secret, again = out / "secret", out / "again"
    for run in (secret, again):
        records = _records(run)
        charges = ledger(records)
        assert len(charges) == 2 == len(records)
        assert all(c.sampling == "all" and c.noise_multiplier == 1.0 for c in charges)
        assert all(not {"clients", "samples", "loss", "failed"} & set(r) for r in records)
        assert [r["round"] for r in _records(run, str(SERVER_ONLY_LOG))] == [1, 2]
        saved = load_checkpoint(list_checkpoints(run)[-1])
        assert ledger(saved.history) == charges
        summary = json.loads((run / "summary.json").read_text())
        assert summary["dp_private"] is True
        assert summary["dp_epsilon"] == pytest.approx(records[-1]["dp_epsilon"])
    # Fresh: the same config and seed, three different noises.
    models = [load_file(str(run / "model.safetensors")) for run in (secret, again)]
    for key, value in models[0].items():
        if value.is_floating_point() and value.numel() > 4 and not key.endswith("running_var"):
            assert not torch.equal(value, models[1][key]), key
            assert not torch.equal(value, reproducible[key]), key
    # The secret reached no client and no file.
    needles = [str(KNOWN_SECRET), f"{KNOWN_SECRET:x}"]
    sent = (out / "sent.txt").read_text()
    assert "experiment" in sent and not any(needle in sent for needle in needles)
    raw = [KNOWN_SECRET.to_bytes(32, order) for order in ("little", "big")]
    for path in secret.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(n.encode() in data for n in needles), path
            assert not any(n in data for n in raw), path
