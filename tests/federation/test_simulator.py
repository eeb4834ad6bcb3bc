"""FedAvg, sampling, seeding and local training."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from fedssd.aggregate import fedavg
from fedssd.data.augment import SSL_AUGMENT
from fedssd.federation import client as client_module
from fedssd.federation.client import LocalSettings, LocalSGD, local_train
from fedssd.federation.sampling import clients_per_round, sample_clients
from fedssd.federation.simulator import Schedule, round_lr, run_rounds
from fedssd.methods import ClientUpdate, Method, MethodContext, build_method
from fedssd.methods.server import aggregate_updates
from fedssd.models import build_model
from fedssd.seeding import CLIENT, derive_seed, generator
from helpers import method_context


def test_fedavg_is_the_weighted_mean() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(8)}
    out = fedavg([a, b], [1.0, 3.0])
    torch.testing.assert_close(out["w"], (a["w"] + 3 * b["w"]) / 4)
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 7
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0]))  # inputs untouched


def test_fedavg_rejects_bad_weights() -> None:
    with pytest.raises(ValueError):
        fedavg([{"w": torch.zeros(1)}], [0.0])
    with pytest.raises(ValueError):
        fedavg([], [])


def test_fedavg_averages_batchnorm_statistics() -> None:
    m1 = build_model(encoder="small_cnn", width=4, projector_hidden=8)
    m2 = build_model(encoder="small_cnn", width=4, projector_hidden=8)
    m2.encoder.apply(
        lambda mod: mod.running_mean.fill_(2.0) if isinstance(mod, torch.nn.BatchNorm2d) else None
    )
    out = fedavg([m1.state_dict(), m2.state_dict()], [1.0, 1.0])
    means = [v for k, v in out.items() if k.startswith("encoder") and k.endswith("running_mean")]
    assert means and all(torch.allclose(v, torch.ones_like(v)) for v in means)


def count_batches(num_samples: int, *, batch_size: int, epochs: int) -> int:
    """Mini-batches per the paper: full and partial batches, minus size-1 ones (BatchNorm)."""
    full, rest = divmod(num_samples, batch_size)
    return epochs * (full + (1 if rest >= 2 else 0))


def test_sampling_cross_silo_and_cross_device() -> None:
    assert sample_clients(num_clients=10, fraction=1.0, round_index=3, seed=0) == list(range(10))
    assert clients_per_round(num_clients=50, fraction=0.2) == 10
    a = sample_clients(num_clients=50, fraction=0.2, round_index=0, seed=17)
    assert len(a) == 10 and len(set(a)) == 10 and a == sorted(a)
    assert a == sample_clients(num_clients=50, fraction=0.2, round_index=0, seed=17)
    assert a != sample_clients(num_clients=50, fraction=0.2, round_index=1, seed=17)
    assert a != sample_clients(num_clients=50, fraction=0.2, round_index=0, seed=18)


def test_derived_seeds_are_distinct_and_stable() -> None:
    seeds = {derive_seed(17, CLIENT, r, k) for r in range(5) for k in range(10)}
    assert len(seeds) == 50
    assert derive_seed(17, CLIENT, 0, 0) == derive_seed(17, CLIENT, 0, 0)


def test_cosine_schedule() -> None:
    schedule = Schedule(num_clients=1, fraction=1, rounds=4, lr=0.1, lr_schedule="cosine", seed=0)
    assert round_lr(schedule, 0) == pytest.approx(0.1)
    assert round_lr(schedule, 2) == pytest.approx(0.05)
    constant = Schedule(num_clients=1, fraction=1, rounds=4, lr=0.1, lr_schedule="constant", seed=0)
    assert round_lr(constant, 3) == 0.1


def _local(seed: int, indices: torch.Tensor, images: torch.Tensor) -> tuple[dict, float, int]:
    torch.manual_seed(0)
    model = build_model(encoder="small_cnn", width=4, projector_hidden=16, projector_out=None)
    method = build_method(
        "ssd",
        {},
        MethodContext(
            num_clients=2, feature_dim=16, embed_dim=16, seed=0, device=torch.device("cpu")
        ),
    )
    settings = LocalSettings(
        epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4, augment=SSL_AUGMENT
    )
    result = local_train(
        model,
        method,
        images,
        indices,
        settings=settings,
        generator=generator(seed, CLIENT, 0, 1),
        client_id=1,
        position=0,
    )
    return model.state_dict(), result.loss, result.num_batches


def test_local_training_is_reproducible_and_counts_batches() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    indices = torch.arange(5, 38)  # 33 samples: batches of 16, 16 and a skipped 1
    s1, loss1, batches = _local(3, indices, images)
    s2, loss2, _ = _local(3, indices, images)
    _, loss3, _ = _local(4, indices, images)
    assert batches == count_batches(33, batch_size=16, epochs=2) == 4
    assert loss1 == loss2 and loss1 != loss3
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_fused_sgd_trains_like_the_per_tensor_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    indices = torch.arange(48)
    made: list[LocalSGD] = []

    def recording_sgd(*args: Any, **kwargs: Any) -> LocalSGD:
        made.append(LocalSGD(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(client_module, "LocalSGD", recording_sgd)
    fused, fused_loss, _ = _local(3, indices, images)
    monkeypatch.setattr(client_module, "fused_sgd", lambda params: False)
    plain, plain_loss, _ = _local(3, indices, images)
    assert [opt.fused for opt in made] == [True, False]
    assert fused_loss == pytest.approx(plain_loss, rel=1e-4)
    for key, value in plain.items():
        torch.testing.assert_close(fused[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("fused", [True, None])
def test_local_sgd_steps_exactly_like_torch_optim_sgd(
    fused: bool | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bit-identical weights after steps with momentum and weight decay, a frozen parameter,
    and a step in which part of the model has no gradient (its momentum waits)."""
    monkeypatch.setattr(client_module, "fused_sgd", lambda params: fused)
    torch.manual_seed(0)
    ours = torch.nn.Sequential(
        torch.nn.Linear(7, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    )
    theirs = copy.deepcopy(ours)
    for model in (ours, theirs):
        model[3].bias.requires_grad_(False)
    trained = [[p for p in m.parameters() if p.requires_grad] for m in (ours, theirs)]
    settings = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    local = LocalSGD(trained[0], **settings)
    reference = torch.optim.SGD(trained[1], **settings, fused=fused)
    for step in range(5):
        x = torch.randn(16, 7)
        for model, zero, update in (
            (ours, local.zero_grad, local.step),
            (theirs, lambda: reference.zero_grad(set_to_none=True), reference.step),
        ):
            zero()
            out = model[0](x) if step == 2 else model(x)  # step 2: the first layer alone
            out.pow(2).mean().backward()
            update()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_a_process_that_trains_does_not_import_torch_dynamo(tmp_path: Path) -> None:
    """torch.optim's optimizer classes import torch._dynamo on first use, about 2 CPU-seconds
    at the start of every process that trains (a Flower ClientApp is one per message)."""
    code = (
        "import sys; from fedssd.api import train; "
        "train('smoke', overrides=['federation.rounds=1', 'threads=1', "
        f"'evaluation.linear_epochs=1'], out={str(tmp_path / 'run')!r}, log=None); "
        "print('torch._dynamo' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "False", done.stdout[-3000:]


def _settings(*, epochs: int = 1, batch_size: int = 8) -> LocalSettings:
    return LocalSettings(
        epochs=epochs,
        batch_size=batch_size,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-4,
        augment=SSL_AUGMENT,
    )


class Recording:
    """A method that delegates to another and records every round's client updates."""

    def __init__(self, inner: Method) -> None:
        self.inner = inner
        self.rounds: list[list[ClientUpdate]] = []

    def local_loss(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.inner.local_loss(*args, **kwargs)

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
    ) -> dict[str, torch.Tensor]:
        self.rounds.append(list(updates))
        return aggregate_updates(self.inner, global_state, updates, round_index=round_index)


def test_round_loop_trains_each_sampled_client_from_the_global_model() -> None:
    """Each update equals a stand-alone local_train from that round's global weights with the
    client's own stream SeedSequence([seed, CLIENT, round, client_id]), is weighted by its batch
    count, and the new global model is their FedAvg."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (80, 3, 8, 8), dtype=torch.uint8)
    sizes = [9, 17, 33, 5, 12, 4]
    bounds = [0, *torch.tensor(sizes).cumsum(0).tolist()]
    indices = [torch.arange(a, b) for a, b in itertools.pairwise(bounds)]

    def new_model() -> torch.nn.Module:
        return build_model(encoder="small_cnn", width=2, projector_hidden=8, projector_out=None)

    global_model, client_model = new_model(), new_model()
    method = Recording(
        build_method("ssd", {}, method_context(num_clients=6, feature_dim=8, embed_dim=8))
    )
    states = [{k: v.clone() for k, v in global_model.state_dict().items()}]

    def snapshot(_record: dict[str, Any], model: torch.nn.Module) -> None:
        states.append({k: v.clone() for k, v in model.state_dict().items()})

    schedule = Schedule(
        num_clients=6, fraction=0.5, rounds=2, lr=0.05, lr_schedule="constant", seed=5
    )
    history = run_rounds(
        global_model=global_model,
        client_model=client_model,
        method=method,
        images=images,
        client_indices=indices,
        schedule=schedule,
        settings=_settings(),
        callbacks=[snapshot],
    )
    assert [r["clients"] for r in history] == [
        sample_clients(num_clients=6, fraction=0.5, round_index=r, seed=5) for r in range(2)
    ]
    for round_index, updates in enumerate(method.rounds):
        assert [u.client_id for u in updates] == history[round_index]["clients"]
        for update in updates:
            k = update.client_id
            assert update.weight == count_batches(sizes[k], batch_size=8, epochs=1)
            alone = new_model()
            alone.load_state_dict(states[round_index])
            local_train(
                alone,
                method.inner,
                images,
                indices[k],
                settings=_settings(),
                generator=generator(5, CLIENT, round_index, k),
                client_id=k,
                position=0,
            )
            for key, value in alone.state_dict().items():
                torch.testing.assert_close(update.state[key], value, rtol=0, atol=0)
        expected = fedavg([u.state for u in updates], [u.weight for u in updates])
        for key, value in expected.items():
            assert torch.equal(states[round_index + 1][key], value)
