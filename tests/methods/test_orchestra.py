"""Orchestra (Lubana et al., ICML 2022; docs/methods.md).

Sinkhorn-Knopp, clustering, EMA target, hooks, runs.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F

from fedssd import cli
from fedssd.aggregate import fedavg
from fedssd.data.augment import SSL_AUGMENT, two_views
from fedssd.data.datasets import load_dataset
from fedssd.errors import ConfigError
from fedssd.federation.client import LocalSettings, local_train
from fedssd.federation.simulator import Schedule, run_rounds
from fedssd.methods import ClientUpdate, MethodContext, build_method
from fedssd.methods.orchestra import (
    CENTROIDS_KEY,
    PAYLOAD_KEY,
    TARGET_PREFIX,
    Orchestra,
    OrchestraOptions,
    cluster_assignment_loss,
    ema_update,
    global_clustering,
    local_clustering,
    rotate_quarter_turns,
    sinkhorn_knopp,
)
from fedssd.models import SSLModel, build_model
from fedssd.runs.store import ClientStore
from helpers import method_context

FASHION = Path("/usr/share/datasets/fashion-mnist")
SMOKE = str(Path(__file__).resolve().parents[2] / "src" / "fedssd" / "configs" / "smoke.toml")


def _context(num_clients: int = 4, embed_dim: int = 8) -> MethodContext:
    return method_context(num_clients, feature_dim=8, embed_dim=embed_dim)


def _model(method: Orchestra, *, width: int = 2, hidden: int = 8, out: int = 8) -> SSLModel:
    torch.manual_seed(0)
    model = build_model(
        encoder="small_cnn", width=width, projector_hidden=hidden, projector_out=out
    )
    model.extras.update(method.extra_modules())
    return model


# --- Sinkhorn-Knopp ---------------------------------------------------------------------------


def test_sinkhorn_pins_from_the_spec() -> None:
    """docs/methods.md: equipartition overrides a shared preference; the 2x2 case at lambda 25."""
    same = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(same, torch.full((2, 2), 0.5), atol=1e-6, rtol=0)
    converged = sinkhorn_knopp(
        torch.tensor([[1.0, 0.0], [0.9, 0.1]]), tolerance=0.0, max_iterations=1000
    )
    expected = torch.tensor([[0.9241, 0.0759], [0.0759, 0.9241]])
    torch.testing.assert_close(converged, expected, atol=1e-4, rtol=0)
    # The released stopping rule (1e-2, checked every 10 iterations) is within 1e-3 of it.
    early = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [0.9, 0.1]]))
    torch.testing.assert_close(early, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("scores", [[[0.3, -0.2], [0.7, 0.1]], [[0.0, 0.5], [-0.4, 0.2]]])
def test_sinkhorn_2x2_matches_the_closed_form(scores: list[list[float]]) -> None:
    """A balanced 2x2 plan is [[a, 1/2 - a], [1/2 - a, a]] and keeps the kernel's cross-ratio:
    a / (1/2 - a) = exp(lambda (s11 + s22 - s12 - s21) / 2)."""
    s = torch.tensor(scores)
    ratio = math.exp(25 * float(s[0, 0] + s[1, 1] - s[0, 1] - s[1, 0]) / 2)
    a = 0.5 * ratio / (1 + ratio)
    expected = 2 * torch.tensor([[a, 0.5 - a], [0.5 - a, a]])
    out = sinkhorn_knopp(s, tolerance=0.0, max_iterations=2000)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_sinkhorn_assignments_are_balanced() -> None:
    g = torch.Generator().manual_seed(3)
    scores = F.normalize(torch.randn(12, 4, generator=g), dim=1)
    out = sinkhorn_knopp(scores, tolerance=0.0, max_iterations=2000)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(12), atol=1e-5, rtol=0)
    # lambda = 25 converges slowly: the column sums are n / k to 1e-3 after 2000 iterations.
    torch.testing.assert_close(out.sum(dim=0), torch.full((4,), 3.0), atol=1e-3, rtol=0)
    assert bool((out >= 0).all())


def test_sinkhorn_hard_assignment_is_the_brute_force_balanced_optimum() -> None:
    """Six samples, three clusters of two: the argmax of each row is the balanced assignment
    with the largest total score, found by enumerating all 90 of them."""
    g = torch.Generator().manual_seed(1)
    scores = F.normalize(torch.randn(6, 3, generator=g), dim=1)
    best, best_score = None, -math.inf
    for labels in itertools.product(range(3), repeat=6):
        if sorted(labels) != [0, 0, 1, 1, 2, 2]:
            continue
        total = sum(float(scores[i, c]) for i, c in enumerate(labels))
        if total > best_score:
            best, best_score = labels, total
    out = sinkhorn_knopp(scores, sharpness=25.0, tolerance=0.0, max_iterations=1000)
    assert tuple(out.argmax(dim=1).tolist()) == best


# --- loss pieces ------------------------------------------------------------------------------


def test_cluster_loss_pin_and_one_directional_gradient() -> None:
    """docs/methods.md: T = 0.1, C = (e1, e2), online e1, target (0.8, 0.6) -> 1.19207."""
    online = torch.tensor([[1.0, 0.0]], requires_grad=True)
    target = torch.tensor([[0.8, 0.6]], requires_grad=True)
    loss = cluster_assignment_loss(online, target, torch.eye(2), temperature=0.1)
    q = torch.softmax(torch.tensor([8.0, 6.0]), 0)
    hand = -(q * torch.log_softmax(torch.tensor([10.0, 0.0]), 0)).sum()
    assert loss.item() == pytest.approx(1.19207, abs=1e-5)
    assert loss.item() == pytest.approx(hand.item(), abs=1e-6)
    loss.backward()
    assert target.grad is None and online.grad is not None


def test_rotation_by_quarter_turns() -> None:
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(4, 1, 1, 1)
    out = rotate_quarter_turns(image, torch.tensor([0, 1, 2, 3]))
    # Counter-clockwise: one turn brings the top-right pixel to the top-left.
    assert out[0, 0].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert out[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]
    assert out[2, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    assert out[3, 0].tolist() == [[3.0, 1.0], [4.0, 2.0]]


# --- clustering -------------------------------------------------------------------------------


def test_local_centroids_are_normalised_means_of_equal_size_clusters() -> None:
    """Two groups of four: the centroids are the normalised means of each group, whatever rows
    the clustering starts from."""
    group_a = F.normalize(torch.tensor([[1.0, 0.1, 0], [1, -0.1, 0], [1, 0, 0.2], [1, 0.2, 0.1]]))
    group_b = F.normalize(torch.tensor([[0.1, 1.0, 0], [0, 1, 0.3], [-0.1, 1, 0], [0, 1, -0.2]]))
    memory = torch.cat([group_a, group_b])[torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])]
    expected = torch.stack(
        [F.normalize(group_a.mean(0), dim=0), F.normalize(group_b.mean(0), dim=0)]
    )
    for seed in range(4):
        out = local_clustering(memory, 2, generator=torch.Generator().manual_seed(seed))
        order = out[:, 0].argsort(descending=True)  # the group-a centroid first
        torch.testing.assert_close(out[order], expected, atol=1e-6, rtol=0)


def test_local_clustering_with_fewer_rows_than_centroids() -> None:
    memory = F.normalize(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))
    out = local_clustering(memory, 16, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 5)
    # Three rows, three balanced clusters: each centroid is one of the rows.
    assert sorted((out @ memory.T).argmax(1).tolist()) == [0, 1, 2]


@pytest.mark.parametrize("seed", [0, 1])
def test_server_clustering_recovers_the_clusters_of_local_centroids(seed: int) -> None:
    """Local centroids around four orthogonal directions: after the server's clustering (spec
    defaults) each direction's points share one global centroid, a different one per direction,
    and the clustering loss has gone down."""
    g = torch.Generator().manual_seed(100 + seed)
    truth = torch.eye(8)[:4]
    points = F.normalize(truth.repeat_interleave(5, 0) + 0.05 * torch.randn(20, 8, generator=g))
    start = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)))

    def objective(c: torch.Tensor) -> float:
        scores = points @ c.T
        q = sinkhorn_knopp(scores)
        return -F.cosine_similarity(q, torch.softmax(scores / 0.1, 1), dim=1).mean().item()

    out = global_clustering(points, start)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    labels = (points @ out.T).argmax(dim=1).view(4, 5)
    assert all(len(set(row.tolist())) == 1 for row in labels)
    assert sorted(labels[:, 0].tolist()) == [0, 1, 2, 3]
    assert objective(out) < objective(start) - 0.05


# --- EMA target and per-client state ------------------------------------------------------------


def test_ema_update_pin() -> None:
    """The BYOL EMA step with Orchestra's m = 0.996: target 0, online 1 -> 0.004 after one step."""
    target = [torch.zeros(3)]
    ema_update(target, [torch.ones(3)], 0.996)
    torch.testing.assert_close(target[0], torch.full((3,), 0.004))


def test_after_step_moves_target_parameters_only() -> None:
    method = Orchestra(OrchestraOptions(init_round=False), _context())
    model = _model(method)
    method.begin_client(model, None, client_id=0, round_index=0)
    assert method._target is not None
    target = method._target
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
        for p in (*model.encoder.parameters(), *model.projector.parameters()):
            p.fill_(1.0)
    buffers = {k: v.clone() for k, v in target.named_buffers()}
    method.after_step(model)
    for p in target.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.004))
    for k, v in target.named_buffers():
        assert torch.equal(v, buffers[k])


def _one_round(
    method: Orchestra,
    model: SSLModel,
    store: ClientStore,
    client_id: int,
    round_index: int,
    shift: float,
) -> None:
    """A client's round by hand: begin, a step's worth of EMA, end (stored under its id)."""
    method.begin_client(model, store.get(client_id), client_id=client_id, round_index=round_index)
    with torch.no_grad():
        for p in (*model.encoder.parameters(), *model.projector.parameters()):
            p.add_(shift)
    method.after_step(model)
    state, _ = method.end_client(
        model, store.get(client_id), client_id=client_id, round_index=round_index
    )
    store.put(client_id, state)


def test_target_is_kept_per_client_across_a_gap() -> None:
    """Client mode: first participation copies the global online network; a client that returns
    after other clients trained gets its own target back, not the global one or another client's."""
    method = Orchestra(OrchestraOptions(init_round=False, target_mode="client"), _context())
    model = _model(method)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    store = ClientStore()
    method.begin_client(model, None, client_id=3, round_index=0)
    assert method._target is not None
    first = method._target.state_dict()
    for k, v in first.items():
        assert torch.equal(v, global_state[k])  # encoder.* and projector.* keys match the model
    method.end_client(model, None, client_id=3, round_index=0)

    _one_round(method, model, store, client_id=3, round_index=0, shift=0.5)
    kept = {k: v.clone() for k, v in store.get(3).tensors.items()}  # type: ignore[union-attr]
    model.load_state_dict(global_state)
    _one_round(method, model, store, client_id=5, round_index=1, shift=-0.5)
    model.load_state_dict(global_state)
    method.begin_client(model, store.get(3), client_id=3, round_index=4)
    assert method._target is not None
    restored = method._target.state_dict()
    assert set(kept) == {f"target.{k}" for k in restored}
    for k, v in restored.items():
        assert torch.equal(v, kept[f"target.{k}"])
    changed = any(not torch.equal(v, global_state[k]) for k, v in restored.items())
    assert changed
    other = store.get(5)
    assert other is not None
    weight = "target.projector.0.weight"
    assert not torch.equal(other.tensors[weight], kept[weight])


def _target_state(method: Orchestra) -> dict[str, torch.Tensor]:
    assert method._target is not None
    return {k: v.clone() for k, v in method._target.state_dict().items()}


def _settings(**changes: float) -> LocalSettings:
    values: dict[str, float] = {"momentum": 0.9, "weight_decay": 1e-4, **changes}
    return LocalSettings(epochs=1, batch_size=6, lr=0.05, augment=SSL_AUGMENT, **values)  # type: ignore[arg-type]


def test_global_mode_averages_the_target_and_keeps_no_client_state() -> None:
    """Default (released code, docs/methods.md): each client starts from the global
    target, sends its target, the server FedAvgs the targets with the weights' weights, and the
    client store holds no tensor; the global target survives a state_dict round trip."""
    assert OrchestraOptions().target_mode == "global"
    options = OrchestraOptions(
        global_centroids=4, local_centroids=2, memory_size=8, server_steps=5, init_round=False
    )
    method = Orchestra(options, _context(num_clients=2))
    images = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8)
    global_model, client_model = _model(method), _model(method)
    online = {k: v.clone() for k, v in global_model.state_dict().items()}
    store = ClientStore()
    schedule = Schedule(
        num_clients=2, fraction=1.0, rounds=2, lr=0.05, lr_schedule="constant", seed=1
    )
    starts: list[dict[str, torch.Tensor]] = []
    updates: list[list[ClientUpdate]] = []
    begin, aggregate = method.begin_client, method.aggregate

    def recording_begin(model, stored, *, client_id, round_index):  # type: ignore[no-untyped-def]
        assert stored is None or not stored.tensors  # nothing kept from an earlier round
        begin(model, stored, client_id=client_id, round_index=round_index)
        starts.append(_target_state(method))

    def recording(global_state, new_updates, *, round_index):  # type: ignore[no-untyped-def]
        updates.append(list(new_updates))
        return aggregate(global_state, new_updates, round_index=round_index)

    method.begin_client = recording_begin  # type: ignore[method-assign]
    method.aggregate = recording  # type: ignore[method-assign]
    run_rounds(
        global_model=global_model,
        client_model=client_model,
        method=method,
        images=images,
        client_indices=[torch.arange(0, 12), torch.arange(12, 30)],  # unequal weights 2 : 3
        schedule=schedule,
        settings=_settings(),
        store=store,
    )
    # Round 0: no global target yet, both clients start from the global online network.
    for start in starts[:2]:
        for k, v in start.items():
            assert torch.equal(v, online[k])
    # The server's target after round 0 is the FedAvg of the two uploaded targets ...
    round0 = updates[0]
    assert {u.weight for u in round0} == {2.0, 3.0}
    sent = [{k[len(TARGET_PREFIX) :]: v for k, v in u.payload.items() if k != PAYLOAD_KEY}
            for u in round0]  # fmt: skip
    assert set(sent[0]) == set(starts[0])
    assert not torch.equal(sent[0]["projector.0.weight"], sent[1]["projector.0.weight"])
    expected = fedavg(sent, [u.weight for u in round0])
    # ... and both clients of round 1 start from it, whatever they sent themselves.
    for start in starts[2:]:
        assert set(start) == set(expected)
        for k, v in start.items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    # The target never enters the model's state (SGD and the weights' FedAvg never see it).
    assert not any("target" in k for k in global_model.state_dict())
    # No per-client state: the store's entries hold no tensor and no scalar.
    assert len(store) == 2
    for client_id in (0, 1):
        kept = store.get(client_id)
        assert kept is not None and not kept.tensors and not kept.scalars
    # The global target is the method's server state: checkpointed and restored exactly.
    saved = method.state_dict()
    final = fedavg(
        [{k[len(TARGET_PREFIX) :]: v for k, v in u.payload.items() if k != PAYLOAD_KEY}
         for u in updates[1]],
        [u.weight for u in updates[1]],
    )  # fmt: skip
    assert set(saved) == {f"{TARGET_PREFIX}{k}" for k in final}
    for k, v in final.items():
        assert torch.equal(saved[f"{TARGET_PREFIX}{k}"], v)
    fresh = Orchestra(options, _context(num_clients=2))
    fresh.load_state_dict(saved)
    fresh.begin_client(client_model, None, client_id=0, round_index=2)
    for k, v in _target_state(fresh).items():
        assert torch.equal(v, final[k])


def test_target_is_never_trained_by_sgd() -> None:
    """Local SGD (momentum, weight decay) moves the online network but never the target: with
    m = 1 the EMA keeps it frozen, so it must end exactly where it started; with m = 0.996 one
    step gives exactly the EMA of the start and the online network after that step."""
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    modes: tuple[Literal["global", "client"], ...] = ("global", "client")
    for mode in modes:
        method = Orchestra(
            OrchestraOptions(
                global_centroids=4, local_centroids=2, memory_size=8,
                target_momentum=1.0, init_round=False, target_mode=mode,
            ),
            _context(num_clients=2),
        )  # fmt: skip
        model = _model(method)
        method.begin_client(model, None, client_id=0, round_index=0)
        assert method._target is not None
        assert all(not p.requires_grad for p in method._target.parameters())
        trained = {id(p) for p in model.parameters()}
        assert not any(id(p) in trained for p in method._target.parameters())
        before = _target_state(method)
        online = [p.clone() for p in model.encoder.parameters()]
        result = local_train(
            model, method, images, torch.arange(12), settings=_settings(),
            generator=torch.Generator().manual_seed(0), client_id=0, position=0,
            after_step=method.after_step,
        )  # fmt: skip
        assert result.num_batches == 2
        moved = zip(online, model.encoder.parameters(), strict=True)
        assert any(not torch.equal(a, b) for a, b in moved)
        after = _target_state(method)
        for k, v in before.items():
            if "running" in k or "num_batches" in k:
                continue  # the target runs in train mode: its BN statistics follow the data
            assert torch.equal(v, after[k]), k
    # m = 0.996: one SGD step, then the target is 0.996 start + 0.004 online (nothing else).
    method = Orchestra(
        OrchestraOptions(global_centroids=4, local_centroids=2, memory_size=8, init_round=False),
        _context(num_clients=2),
    )
    model = _model(method)
    method.begin_client(model, None, client_id=0, round_index=0)
    assert method._target is not None
    start = [p.clone() for p in method._target.parameters()]
    local_train(
        model, method, images[:6], torch.arange(6), settings=_settings(),
        generator=torch.Generator().manual_seed(0), client_id=0, position=0,
        after_step=method.after_step,
    )  # fmt: skip
    online_after = [*model.encoder.parameters(), *model.projector.parameters()]
    for t, s0, o in zip(method._target.parameters(), start, online_after, strict=True):
        torch.testing.assert_close(t, 0.996 * s0 + 0.004 * o)


# --- rounds and aggregation ---------------------------------------------------------------------


def _fashion(n: int) -> torch.Tensor:
    assert FASHION.is_dir(), f"Fashion-MNIST is not in {FASHION}; run `make data`"
    data = load_dataset("fashion_mnist", path=FASHION, download=False)
    return data.x_train[:n]


@pytest.mark.slow
def test_loss_falls_over_a_few_steps_on_fashion_mnist() -> None:
    """Cluster-assignment + rotation loss of one client on 128 real images falls over 40 steps."""
    torch.set_num_threads(1)
    images = _fashion(128)
    method = Orchestra(
        OrchestraOptions(global_centroids=16, memory_size=64, init_round=False),
        _context(embed_dim=32),
    )
    model = _model(method, width=4, hidden=32, out=32)
    model.train()
    method.begin_client(model, None, client_id=0, round_index=0)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9
    )
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(40):
        batch = images[(step % 2) * 64 : (step % 2 + 1) * 64]
        view1, view2 = two_views(batch, SSL_AUGMENT, generator=gen)
        loss, parts = method.local_loss(model, view1, view2, client_id=0, position=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.after_step(model)
        losses.append(loss.item())
        assert set(parts) == {"cluster", "rotation"}
    _, payload = method.end_client(model, None, client_id=0, round_index=0)
    assert payload[PAYLOAD_KEY].shape == (16, 32)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_init_round_changes_no_weight_and_the_server_sets_the_centroids() -> None:
    """Round 0 with ``init_round`` trains nothing, sends local centroids; the aggregate returns
    every key, the FedAvg of the weights, and new centroids from the server's clustering."""
    options = OrchestraOptions(
        global_centroids=4, local_centroids=2, memory_size=8, server_steps=50
    )
    method = Orchestra(options, _context(num_clients=2))
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    global_model, client_model = _model(method), _model(method)
    start = {k: v.clone() for k, v in global_model.state_dict().items()}
    store = ClientStore()
    schedule = Schedule(
        num_clients=2, fraction=1.0, rounds=2, lr=0.05, lr_schedule="constant", seed=1
    )
    settings = LocalSettings(
        epochs=1, batch_size=6, lr=0.05, momentum=0.9, weight_decay=1e-4, augment=SSL_AUGMENT
    )
    updates: list[list[ClientUpdate]] = []
    aggregate = method.aggregate

    def recording(global_state, new_updates, *, round_index):  # type: ignore[no-untyped-def]
        updates.append(list(new_updates))
        return aggregate(global_state, new_updates, round_index=round_index)

    method.aggregate = recording  # type: ignore[method-assign]
    history = run_rounds(
        global_model=global_model,
        client_model=client_model,
        method=method,
        images=images,
        client_indices=[torch.arange(0, 12), torch.arange(12, 24)],
        schedule=schedule,
        settings=settings,
        store=store,
    )
    assert history[0]["loss"] == 0.0 and history[1]["loss"] > 0
    round0 = updates[0]
    for update in round0:
        assert CENTROIDS_KEY not in update.state  # the centroids are never uploaded
        for k, v in update.state.items():
            assert torch.equal(v, start[k])  # nothing trained in the initial round
        assert update.payload[PAYLOAD_KEY].shape == (2, 8)
    # After round 0 the weights are unchanged and the centroids are the server's clustering.
    expected = global_clustering(
        torch.cat([u.payload[PAYLOAD_KEY] for u in round0]), start[CENTROIDS_KEY], steps=50
    )
    assert len(store) == 2
    after_round0 = method.aggregate(start, round0, round_index=0)
    assert set(after_round0) == set(start)
    torch.testing.assert_close(after_round0[CENTROIDS_KEY], expected)
    # Round 1 trained: its global model is the FedAvg of the updates.
    round1 = updates[1]
    total = sum(u.weight for u in round1)
    key = "projector.0.weight"
    mean = sum(u.state[key] * (u.weight / total) for u in round1)
    torch.testing.assert_close(global_model.state_dict()[key], mean)


def test_options_are_checked_and_global_centroids_capped() -> None:
    with pytest.raises(ConfigError, match="memory_size must be at least"):
        OrchestraOptions(memory_size=8, local_centroids=16)
    with pytest.raises(ConfigError, match="temperature"):
        build_method("orchestra", {"temperature": 0.0}, _context())
    capped = Orchestra(OrchestraOptions(), _context(num_clients=2))
    assert capped.num_global_centroids == 32
    assert capped.extra_modules()["centroids"].global_centroids.shape == (32, 8)
    uncapped = Orchestra(OrchestraOptions(cap_global_centroids=False), _context(num_clients=2))
    assert uncapped.num_global_centroids == 128
    full = Orchestra(OrchestraOptions(), _context(num_clients=10))
    assert full.num_global_centroids == 128
    # The extras come from the run seed alone: identical for the global and the client model.
    a, b = full.extra_modules(), full.extra_modules()
    for key, value in a["rotation_head"].state_dict().items():
        assert torch.equal(value, b["rotation_head"].state_dict()[key])


@pytest.mark.parametrize(
    ("setting", "clients", "fraction", "rounds"), [("silo", 3, 1.0, 2), ("device", 6, 0.5, 3)]
)
def test_cli_runs_in_both_settings(
    setting: str, clients: int, fraction: float, rounds: int, tmp_path: Path
) -> None:
    out = tmp_path / setting
    code = cli.main(
        [
            "train",
            "--config",
            SMOKE,
            "--set",
            "method.name=orchestra",
            "--set",
            "method.server_steps=20",
            "--set",
            f"federation.num_clients={clients}",
            "--set",
            f"federation.fraction={fraction}",
            "--set",
            f"federation.rounds={rounds}",
            "--set",
            "evaluation.linear_epochs=2",
            "--set",
            "evaluation.every=0",
            "--set",
            "data.train_subset=600",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "orchestra"
