"""FedSimCLR, FedSimSiam, FedBYOL, FedU and FedEMA, as docs/methods.md describes them."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedssd.cli import main
from fedssd.data.augment import SSL_AUGMENT, two_views
from fedssd.data.datasets import load_dataset
from fedssd.errors import ConfigError
from fedssd.experiment import attach_extras
from fedssd.federation.client import LocalSettings
from fedssd.federation.sampling import sample_clients
from fedssd.federation.simulator import Schedule, run_rounds
from fedssd.methods import METHODS, build_method, resolve_options
from fedssd.methods.byol_common import (
    divergence,
    divergence_keys,
    ema,
    ema_update_,
    predictor_of,
)
from fedssd.methods.fedema import FedEMA, FedEMAOptions, auto_lambda, ema_decay
from fedssd.methods.fedu import FedU, FedUOptions, dapu_keeps_local
from fedssd.methods.protocol import ClientHooks, ClientState, ClientUpdate, Method
from fedssd.models import SSLModel, build_model
from fedssd.models.heads import mlp_predictor
from fedssd.runs.store import ClientStore
from helpers import method_context

NAMES = ("fedsimclr", "fedsimsiam", "fedbyol", "fedu", "fedema")
SMOKE = "src/fedssd/configs/smoke.toml"


def tiny_model(method: Method, seed: int = 0) -> SSLModel:
    """small_cnn of width 4 (16 features, 16-d embedding) with the method's extras."""
    torch.manual_seed(seed)
    model = build_model(
        encoder="small_cnn", in_channels=1, width=4, projector_hidden=32, projector_out=None
    )
    attach_extras(model, method, seed=seed)
    return model


def first_weight(module: nn.Module) -> torch.Tensor:
    """The weight of the first Linear inside ``module`` (a predictor or projector)."""
    linear = next(m for m in module.modules() if isinstance(m, nn.Linear))
    return linear.weight.detach()


def build(name: str, num_clients: int = 4, **options: Any) -> Method:
    extra: dict[str, object] = {} if name == "fedsimclr" else {"predictor_hidden": 32}
    return build_method(name, {**extra, **options}, method_context(num_clients))


def shift(state: dict[str, torch.Tensor], keys: list[str], norm: float) -> dict[str, torch.Tensor]:
    """``state`` with every tensor of ``keys`` moved by a constant tensor of L2 norm ``norm``."""
    out = {k: v.clone() for k, v in state.items()}
    for key in keys:
        out[key] = out[key] + norm / math.sqrt(out[key].numel())
    return out


@pytest.fixture(scope="module")
def fmnist() -> torch.Tensor:
    """256 Fashion-MNIST training images, ``(256, 1, 28, 28)`` uint8."""
    data = load_dataset("fashion_mnist", download=False, pad_to_32=False, rgb=False)
    return data.x_train[:256].clone()


# --- (a) the loss falls on real data ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_local_loss_falls_on_fashion_mnist(name: str, fmnist: torch.Tensor) -> None:
    method = build(name, target_momentum=0.9) if name in ("fedbyol", "fedu", "fedema") else None
    method = method or build(name)
    model = tiny_model(method)
    hooks = method if isinstance(method, ClientHooks) else None
    if hooks is not None:
        hooks.begin_client(model, None, client_id=0, round_index=0)
    augment = dataclasses.replace(SSL_AUGMENT, size=28)
    g = torch.Generator().manual_seed(0)
    batches = [two_views(fmnist[i : i + 32], augment, generator=g) for i in range(0, 128, 32)]
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9
    )
    model.train()
    history = []
    for _epoch in range(5):
        total = 0.0
        for v1, v2 in batches:
            loss, _ = method.local_loss(model, v1, v2, client_id=0, position=0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if hooks is not None:
                hooks.after_step(model)
            total += float(loss.detach())
        history.append(total / len(batches))
    assert history[-1] < history[0] - 0.05, history


# --- (b) pinned pieces ---------------------------------------------------------------------


def test_ema_pin_and_parameters_only() -> None:
    # FedBYOL (Grill et al., NeurIPS 2020), docs/methods.md: m = 0.99, target 0, online 1 -> 0.01
    # after one update.
    assert float(ema(torch.tensor(0.0), torch.tensor(1.0), 0.99)) == pytest.approx(0.01)
    target = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
        for p in online.parameters():
            p.fill_(1.0)
        bn = online[1]
        assert isinstance(bn, nn.BatchNorm1d) and bn.running_mean is not None
        bn.running_mean.fill_(9.0)
    ema_update_(target, online, 0.99)
    for p in target.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.01))
    torch.testing.assert_close(target[1].running_mean, torch.zeros(2))  # buffers are its own


def test_target_network_copies_then_lags_then_persists_per_client() -> None:
    method = build("fedbyol", target_momentum=0.5)
    assert isinstance(method, ClientHooks)
    model = tiny_model(method)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    store = ClientStore()
    method.begin_client(model, None, client_id=3, round_index=0)
    target = method.target.module  # type: ignore[attr-defined]
    assert target is not None
    first = next(iter(target.parameters()))
    online_first = next(iter(model.encoder.parameters()))
    assert first is not online_first  # a separate copy, not the online object
    torch.testing.assert_close(first, online_first)
    with torch.no_grad():
        online_first.add_(2.0)
    method.after_step(model)
    torch.testing.assert_close(first, online_first - 1.0)  # halfway with m = 0.5
    kept, payload = method.end_client(model, None, client_id=3, round_index=0)
    assert payload == {}
    kept.last_round = 0
    store.put(3, kept)
    saved = kept.tensors["target.encoder.features.0.weight"].clone()
    # Another client in between starts from the global model and overwrites the module.
    model.load_state_dict(global_state)
    method.begin_client(model, store.get(1), client_id=1, round_index=1)
    torch.testing.assert_close(first, global_state["encoder.features.0.weight"])
    # Client 3 returns two rounds later: its own target, not the global online network.
    model.load_state_dict(global_state)
    method.begin_client(model, store.get(3), client_id=3, round_index=2)
    torch.testing.assert_close(first, saved)
    assert not torch.equal(first, global_state["encoder.features.0.weight"])


def test_divergence_is_the_mean_of_per_layer_distances() -> None:
    a = {"c1": torch.zeros(2, 2), "c2": torch.zeros(3), "skip": torch.zeros(1)}
    b = {"c1": torch.tensor([[0.0, 0.6], [0.8, 0.0]]), "c2": torch.tensor([2.0, 0.0, 0.0])}
    # ||.|| per layer: 1.0 and 2.0 -> mean 1.5 (one global norm would give sqrt(5) = 2.236).
    assert divergence(a, b, ["c1", "c2"]) == pytest.approx(1.5)


def test_divergence_keys_are_the_3x3_convs() -> None:
    resnet = build_model(encoder="resnet18", width=4, projector_hidden=8)
    keys = divergence_keys(resnet)
    assert len(keys) == 17  # stem + 16 block convs
    assert not any("shortcut" in k for k in keys)
    assert all(resnet.state_dict()[k].shape[2:] == (3, 3) for k in keys)
    cnn = build_model(encoder="small_cnn", width=4, projector_hidden=8)
    assert divergence_keys(cnn) == [f"encoder.features.{i}.weight" for i in (0, 4, 8)]


def test_fedu_predictor_rule_pin() -> None:
    # FedU (Zhuang et al., ICCV 2021), docs/methods.md: mu = 0.4; Div = 0.3 -> global predictor;
    # Div = 0.5 -> local.
    assert not dapu_keeps_local(0.3, 0.4)
    assert dapu_keeps_local(0.5, 0.4)
    assert dapu_keeps_local(0.4, 0.4)  # "global if Div < mu": the boundary keeps the local one


@pytest.mark.parametrize(("div", "keeps_local"), [(0.3, False), (0.5, True)])
def test_fedu_begin_client_applies_the_rule(div: float, keeps_local: bool) -> None:
    method = build("fedu")
    assert isinstance(method, FedU)
    model = tiny_model(method)
    keys = divergence_keys(model)
    global_state = model.state_dict()
    last = shift(global_state, keys, div)
    stored = ClientState(
        tensors={
            **{f"last.{k}": last[k] for k in keys},
            **{
                f"predictor.{k}": torch.full_like(v, 7.0) if v.is_floating_point() else v
                for k, v in predictor_of(model).state_dict().items()
            },
        },
        last_round=0,
    )
    global_weight = first_weight(predictor_of(model)).clone()
    method.begin_client(model, stored, client_id=1, round_index=3)
    weight = first_weight(predictor_of(model))
    expected = torch.full_like(weight, 7.0) if keeps_local else global_weight
    torch.testing.assert_close(weight, expected)
    # The encoder is the global one in both cases.
    torch.testing.assert_close(model.state_dict()[keys[0]], global_state[keys[0]])
    kept, _ = method.end_client(model, stored, client_id=1, round_index=3)
    assert kept.scalars["divergence"] == pytest.approx(div, rel=1e-5)
    assert kept.scalars["kept_local_predictor"] == float(keeps_local)


def test_fedu_easyfl_form_uses_the_size_of_the_last_update() -> None:
    method = build("fedu", div_form="easyfl")
    assert isinstance(method, FedU)
    model = tiny_model(method)
    keys = divergence_keys(model)
    method.begin_client(model, None, client_id=0, round_index=0)
    model.load_state_dict(shift(model.state_dict(), keys, 0.25))  # "local training"
    kept, _ = method.end_client(model, None, client_id=0, round_index=0)
    assert kept.scalars["next_divergence"] == pytest.approx(0.25, rel=1e-5)
    assert not any(k.startswith("last.") for k in kept.tensors)


def test_fedema_decay_and_lambda_pin() -> None:
    # FedEMA (Zhuang et al., ICLR 2022), docs/methods.md: tau 0.7, Div^first 0.5 -> lambda 1.4;
    # Div 0.6 -> mu 0.84; W_k 1, W_g 0.
    lam = auto_lambda(0.7, 0.5)
    assert lam == pytest.approx(1.4)
    assert lam is not None
    mu = ema_decay(lam, 0.6)
    assert mu == pytest.approx(0.84)
    assert float(ema(torch.tensor(1.0), torch.tensor(0.0), mu)) == pytest.approx(0.84)
    assert ema_decay(lam, 0.6, cap=0.7) == pytest.approx(0.7)  # FedU2's cap
    assert ema_decay(lam, 5.0) == 1.0
    assert auto_lambda(0.7, 0.0) is None


def fedema_returning_client(
    *, div: float, lam: float, gap: int = 1, **options: Any
) -> tuple[SSLModel, list[str]]:
    """A FedEMA client whose stored model is 1 everywhere (conv layers: a shift of norm ``div``
    from the global model), returning after ``gap`` rounds; the global model is 0 everywhere."""
    method = build("fedema", **options)
    assert isinstance(method, FedEMA)
    model = tiny_model(method)
    keys = divergence_keys(model)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()
    zero = model.state_dict()
    local = shift(zero, keys, div)
    for name, value in local.items():
        if name not in keys and value.is_floating_point():
            local[name] = torch.ones_like(value)
    stored = ClientState(
        tensors={f"online.{k}": v for k, v in local.items()},
        scalars={"lambda": lam},
        last_round=5 - gap,
    )
    method.begin_client(model, stored, client_id=2, round_index=5)
    return model, keys


def test_fedema_interpolates_parameters_with_mu_and_keeps_global_buffers() -> None:
    model, keys = fedema_returning_client(div=0.6, lam=1.4)
    state = model.state_dict()
    for name, value in state.items():
        if name in keys:
            assert float(value.norm()) == pytest.approx(0.84 * 0.6, rel=1e-5)  # mu * local
        elif name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(value, torch.zeros_like(value))  # global buffers
    for name, p in model.named_parameters():
        if name not in keys:
            torch.testing.assert_close(p.detach(), torch.full_like(p, 0.84))
    assert first_weight(predictor_of(model)).mean().item() == pytest.approx(0.84)


def test_fedema_cap_and_local_buffer_switches() -> None:
    model, _ = fedema_returning_client(div=0.6, lam=1.4, mu_cap=0.7, local_buffers=True)
    torch.testing.assert_close(
        first_weight(model.projector), torch.full_like(first_weight(model.projector), 0.7)
    )
    assert float(model.state_dict()["encoder.features.1.running_var"].mean()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("policy", "max_staleness", "gap", "reset"),
    [
        ("keep", 1, 10, False),
        ("selective_ema", 1, 1, False),
        ("selective_ema", 1, 2, True),
        ("reset_to_global", 3, 3, False),
        ("reset_to_global", 3, 4, True),
    ],
)
def test_fedema_staleness_policies(policy: str, max_staleness: int, gap: int, reset: bool) -> None:
    model, _ = fedema_returning_client(
        div=0.6, lam=1.4, gap=gap, stale_policy=policy, max_staleness=max_staleness
    )
    expected = 0.0 if reset else 0.84
    weight = first_weight(model.projector)
    torch.testing.assert_close(weight, torch.full_like(weight, expected))


def test_fedema_paper_scaler_is_calibrated_against_the_aggregated_model() -> None:
    method = build("fedema")
    assert isinstance(method, FedEMA)
    model = tiny_model(method)
    keys = divergence_keys(model)
    method.begin_client(model, None, client_id=2, round_index=0)
    kept, _ = method.end_client(model, None, client_id=2, round_index=0)
    assert "lambda" not in kept.scalars  # needs the model aggregated at the end of the round
    kept.last_round = 0
    mine = {k: v.clone() for k, v in model.state_dict().items()}
    other = shift(mine, keys, 1.0)
    new_global = method.aggregate(
        mine,
        [ClientUpdate(2, mine, 10.0), ClientUpdate(1, other, 10.0)],
        round_index=0,
    )
    # New global conv = mine + shift / 2 -> Div^first = 0.5 -> lambda = 0.7 / 0.5 = 1.4.
    table = method.state_dict()["lambdas"]
    assert float(table[2]) == pytest.approx(1.4, rel=1e-5)
    assert math.isnan(float(table[1]))  # not a first participation of a pending client
    restored = build("fedema")
    restored.load_state_dict(method.state_dict())
    assert float(restored.state_dict()["lambdas"][2]) == pytest.approx(1.4, rel=1e-5)
    # Next participation, one round later: Div = 0.5 again -> mu = tau = 0.7.
    model.load_state_dict(new_global)
    method.begin_client(model, kept, client_id=2, round_index=1)
    again, _ = method.end_client(model, kept, client_id=2, round_index=1)
    assert again.scalars["lambda"] == pytest.approx(1.4, rel=1e-5)
    assert again.scalars["mu"] == pytest.approx(0.7, rel=1e-5)


def test_fedema_easyfl_and_constant_scalers() -> None:
    method = build("fedema", scaler="easyfl")
    model = tiny_model(method)
    keys = divergence_keys(model)
    assert isinstance(method, FedEMA)
    method.begin_client(model, None, client_id=0, round_index=0)
    model.load_state_dict(shift(model.state_dict(), keys, 0.35))  # the first local update
    kept, _ = method.end_client(model, None, client_id=0, round_index=0)
    assert kept.scalars["lambda"] == pytest.approx(0.7 / 0.35, rel=1e-5)
    constant = build("fedema", scaler="constant", constant_lambda=1.0)
    assert isinstance(constant, FedEMA)
    assert constant.scaler_of(0, None) == 1.0


def test_defaults_are_the_spec_values_and_ranges_are_checked() -> None:
    assert resolve_options("fedsimclr", {}).temperature == 0.07
    assert resolve_options("fedbyol", {}).target_momentum == 0.99
    assert resolve_options("fedu", {}).dapu_threshold == 0.4
    ema_options = resolve_options("fedema", {})
    assert isinstance(ema_options, FedEMAOptions)
    assert (ema_options.tau, ema_options.mu_cap, ema_options.stale_policy) == (0.7, 1.0, "keep")
    assert isinstance(resolve_options("fedu", {}), FedUOptions)
    bad_options: list[tuple[str, dict[str, Any]]] = [
        ("fedsimclr", {"temperature": 0.0}),
        ("fedbyol", {"target_momentum": 1.5}),
        ("fedu", {"dapu_threshold": -1.0}),
        ("fedema", {"mu_cap": 1.5}),
        ("fedema", {"stale_policy": "never"}),
        ("fedema", {"max_staleness": 0}),
    ]
    for name, bad in bad_options:
        with pytest.raises(ConfigError):
            resolve_options(name, bad)
    assert all(name in METHODS for name in NAMES)


def test_predictor_shape() -> None:
    head = mlp_predictor(16, hidden_dim=32)
    assert head(torch.randn(5, 16)).shape == (5, 16)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


# --- (c) cross-device: state persists in the store; CLI runs in both settings -------------


def test_fedema_cross_device_state_persists_in_the_store(fmnist: torch.Tensor) -> None:
    method = build("fedema", num_clients=6)
    assert isinstance(method, ClientHooks)
    global_model, client_model = tiny_model(method), tiny_model(method)
    store = ClientStore()
    indices = [torch.arange(20 * k, 20 * (k + 1)) for k in range(6)]
    schedule = Schedule(
        num_clients=6, fraction=0.5, rounds=3, lr=0.05, lr_schedule="constant", seed=17
    )
    settings = LocalSettings(
        epochs=1,
        batch_size=10,
        lr=0.05,
        momentum=0.9,
        weight_decay=0.0,
        augment=dataclasses.replace(SSL_AUGMENT, size=28),
    )
    history = run_rounds(
        global_model=global_model,
        client_model=client_model,
        method=method,
        images=fmnist[:120],
        client_indices=indices,
        schedule=schedule,
        settings=settings,
        store=store,
    )
    assert len(history) == 3 and all(math.isfinite(r["loss"]) for r in history)
    rounds = [
        set(sample_clients(num_clients=6, fraction=0.5, round_index=t, seed=17)) for t in range(3)
    ]
    twice = [k for k in range(6) if sum(k in r for r in rounds) >= 2]
    assert twice, rounds
    for k in twice:
        state = store.get(k)
        assert state is not None
        assert state.participations == sum(k in r for r in rounds)
        assert state.last_round == max(t for t, r in enumerate(rounds) if k in r)
        assert state.scalars["lambda"] > 0 and 0 <= state.scalars["mu"] <= 1
        assert any(name.startswith("target.") for name in state.tensors)
        assert any(name.startswith("online.") for name in state.tensors)


def cli_args(name: str, out: Path, *, device: bool) -> list[str]:
    sets = [
        "data.partition=iid",
        "data.train_subset=120",
        "data.test_subset=60",
        "model.width=4",
        "model.projector_hidden=16",
        "evaluation.every=0",
        "evaluation.linear_epochs=2",
        "evaluation.knn_k=5",
        "evaluation.metrics_samples=60",
        "evaluation.metrics_per_client=10",
        f"method.name={name}",
        f"federation.num_clients={6 if device else 2}",
        f"federation.fraction={0.5 if device else 1.0}",
        "federation.rounds=2",
        "federation.batch_size=20",
    ]
    if name != "fedsimclr":
        sets.append("method.predictor_hidden=16")
    args = ["train", "--config", SMOKE, "--out", str(out), "--quiet"]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.mark.parametrize("device", [False, True], ids=["silo", "device"])
@pytest.mark.parametrize("name", NAMES)
def test_cli_runs_in_both_settings(name: str, device: bool, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(cli_args(name, out, device=device)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == name and summary["rounds"] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(math.isfinite(json.loads(line)["loss"]) for line in lines)
