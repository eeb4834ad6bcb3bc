"""docs/deployment.md's federation, and what goes wrong in one: the page's own deployment.

The module's deployment is the page's, run up to its "Stop" (:mod:`deployment_testing`), the
page's 3-round SSD run included. The tests then share that SuperLink and those SuperNodes:

1. the page's run: its files, the in-process simulator's weights, and no ServerApp or ClientApp
   opened a file of another machine;
2. a mistake in the run config: one sentence in the stream, and ``flwr ls`` says failed;
3. a site's machine dies as its node receives round 2's task of 3 (SIGKILL from inside, at
   that moment): the round names it as gone offline, and the SuperNode started again by the
   page's systemd unit rejoins round 3 with its FedEMA state from its disk;
4. a SuperNode whose key was never registered is refused;
5. last, a SuperLink started again without its database turns the SuperNodes away,
   and they exit with status 0, which is why the page's units say ``Restart=always``.

The coordinator dying, SecAgg+ and distributed DP run on a deployment of their own, beside this
one under pytest-xdist (test_deployment_recovery.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from deployment_testing import (
    LIMIT,
    SITES,
    Deployment,
    alive,
    assert_same_weights,
    hook_env,
    hooks_app,
    in_process,
    records,
    run_id_of,
    running,
    wait_for,
)
from fedssd.flower.node_state import load_client_state
from fedssd.flower.strategy import OFFLINE


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with running(tmp_path_factory.mktemp("deployment"), until="9. Stop", rogue=True) as running_:
        yield running_


@pytest.mark.slow
def test_the_pages_federation(deployment: Deployment, tmp_path: Path) -> None:
    folder = deployment.folder
    out = folder / "coordinator" / "runs" / "hospitals"
    lines = records(out / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3]
    assert all(r["accepted"] == 3 and r["failed"] == {} for r in lines)
    assert all(r["samples"] == {"0": 300, "1": 300, "2": 300} for r in lines)
    partition = json.loads((out / "partition.json").read_text())
    assert partition["sizes"] == [300, 300, 300] and partition["labelled"] == [300, 0, 0]
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["knn_acc"] <= 1.0 and 0.0 <= summary["linear_probe_acc"] <= 1.0
    assert_same_weights(
        in_process(deployment, folder / "coordinator" / "hospitals.toml", tmp_path / "run"),
        out / "model.safetensors",
    )
    # The stream names each site by the name its key was registered under.
    log = (folder / "walkthrough.log").read_text(errors="replace")
    for client, site in enumerate(SITES):
        assert f"client {client} is node " in log and f"(site-{site}): 300 images" in log, log
    # Each ServerApp and ClientApp opened files of its own machine only.
    own = {"serverapp": folder / "coordinator"}
    by_port = {}
    for k, site in enumerate(SITES):
        own[f"site-{site}"] = folder / f"site-{site}"
        by_port[str(deployment.ports[39610 + k])] = f"site-{site}"
    opened: dict[str, set[str]] = {}
    for line in deployment.audit.read_text().splitlines():
        command, _, path = line.partition("\t")
        if "flwr-serverapp" in command:
            party = "serverapp"
        elif "flwr-clientapp" in command:
            party = by_port[command.split("--runtime-api-address")[1].split()[0].split(":")[1]]
        else:
            continue  # the page's own commands, the tests' flwr commands
        opened.setdefault(party, set()).add(path)
    assert set(opened) == set(own), opened.keys()
    for party, files in opened.items():
        foreign = sorted(f for f in files if not f.startswith(str(own[party]) + os.sep))
        assert not foreign, f"{party} opened {foreign[:5]}"


@pytest.mark.slow
def test_a_mistake_in_the_run_is_one_sentence(deployment: Deployment) -> None:
    not_a_run = deployment.folder / "coordinator" / "certs"
    app = deployment.folder / "coordinator" / "flower_app"
    done = deployment.stream(app, resume=True, out=str(not_a_run))
    # Flower's `flwr run` exits 0 however the run ended; the run's status says it failed.
    assert done.returncode == 0
    run_id = run_id_of(done.stdout)
    sentence = f"{not_a_run} is not a fedssd run folder (it has no config.toml)."
    assert f"fedssd run {run_id} failed: {sentence}" in done.stdout, done.stdout[-3000:]
    assert "Traceback" not in done.stdout + done.stderr, done.stdout[-3000:]
    wait_for(lambda: deployment.status(run_id)[0].startswith("finished"), "the run's status")
    status, details = deployment.status(run_id)
    assert status == "finished:failed" and sentence in details, (status, details)


@pytest.mark.slow
def test_a_site_that_dies_mid_round_is_named_and_rejoins(
    deployment: Deployment, tmp_path: Path
) -> None:
    folder = deployment.folder
    experiment = deployment.experiment("site-dies", "fedema", rounds=3)
    out = folder / "coordinator" / "runs" / "site-dies"
    hold = tmp_path / "site-a-is-back"
    streamed = subprocess.Popen(
        ["flwr", "run", str(hooks_app(deployment)), "hospitals", "--stream", "--run-config",
         deployment.run_config(
             config=str(experiment), out=str(out), round_timeout=600.0,
             test_kill_client=0, test_kill_round=2, test_hold_round=2, test_hold_file=str(hold),
         )],
        cwd=folder, env=deployment.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        # Site A's machine goes down as its node receives round 2's task.
        wait_for(lambda: not alive(deployment.nodes["a"]), "site A's SuperNode to die")
        # Its key is let in again once the SuperLink has marked the dead session offline.
        wait_for(lambda: "offline" in deployment.node_statuses(), "site A offline", poll=5.0)
        command, unit_env = deployment.unit("fedssd-supernode")
        restarted = deployment.start(
            "site-a-restarted", command, {**unit_env, **hook_env(deployment)}
        )
        deployment.nodes["a"] = restarted.pid
        deployment.node_logs["a"] = deployment.processes.logs / "site-a-restarted.log"
        wait_for(
            lambda: restarted.poll() is not None or deployment.node_statuses() == ["online"] * 3,
            "site A back online",
            poll=2.0,
        )
        assert restarted.poll() is None, deployment.processes.log("site-a-restarted")
        hold.touch()  # round 3 may start
        output, _ = streamed.communicate(timeout=LIMIT)
    finally:
        if streamed.poll() is None:
            streamed.kill()
            streamed.wait()
    lines = records(out / "metrics.jsonl")
    assert [r["round"] for r in lines] == [1, 2, 3], output[-3000:]
    # Round 2 waited until the SuperLink gave up on the node, not for the 600 s round timeout.
    assert lines[1]["failed"] == {"0": OFFLINE} and lines[1]["accepted"] == 2, lines[1]
    assert all(r["failed"] == {} and r["accepted"] == 3 for i, r in enumerate(lines) if i != 1)
    assert lines[1]["seconds"] < 600
    assert "round 2/3: client 0 (node " in output and f") failed: {OFFLINE}" in output, output
    assert (out / "summary.json").exists(), output[-3000:]
    # FedEMA's state of client 0 survived on its disk: rounds 1 and 3 counted.
    run_key = json.loads((out / "flower.json").read_text())["run-key"]
    kept = load_client_state(folder / "site-a" / "state", run_key, 0, round_index=3)
    assert kept is not None and kept.last_round == 2 and kept.participations == 2


@pytest.mark.slow
def test_an_unregistered_site_is_refused(deployment: Deployment) -> None:
    assert deployment.rogue is not None
    assert deployment.rogue.wait(timeout=LIMIT) != 0, deployment.processes.log("rogue")
    assert "Failed to activate SuperNode" in deployment.processes.log("rogue")
    assert len(deployment.node_statuses()) == 3


@pytest.mark.slow
def test_a_superlink_without_its_database_turns_the_sites_away(deployment: Deployment) -> None:
    """Last: it ends the deployment."""
    os.kill(deployment.superlink, signal.SIGKILL)
    wait_for(lambda: not alive(deployment.superlink), "the SuperLink to die")
    command, unit_env = deployment.unit("fedssd-superlink")
    at = command.index("--database")
    in_memory = command[:at] + command[at + 2 :]
    deployment.start("superlink-in-memory", in_memory, unit_env)
    wait_for(
        lambda: not any(alive(pid) for pid in deployment.nodes.values()),
        "the SuperNodes to exit",
    )
    # Status 0, for those the tests started: a unit's Restart=on-failure would leave them down.
    children = [p for _, p in deployment.processes.started if p.pid in deployment.nodes.values()]
    for process in children:
        assert process.wait(timeout=LIMIT) == 0
