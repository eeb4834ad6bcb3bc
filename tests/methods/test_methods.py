"""The method registry, FedAlignUniform and SSD (Fang et al., ICCV 2025; docs/methods.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import pytest
import torch
from torch import nn

from fedssd.errors import ConfigError
from fedssd.methods import METHODS, ClientUpdate, MethodContext, build_method, resolve_options
from fedssd.methods.protocol import MethodSpec
from fedssd.methods.server import aggregate_updates, load_server_state, server_state
from fedssd.methods.ssd import SSD, SSDOptions, draw_scaling_sets
from fedssd.models import build_model
from helpers import method_context


@pytest.mark.parametrize(("num_clients", "size"), [(10, 51), (50, 10)])
def test_scaling_sets_are_disjoint_and_of_size_floor_d_over_k(num_clients: int, size: int) -> None:
    sets = draw_scaling_sets(embed_dim=512, num_clients=num_clients, seed=17)
    assert sets.dims.shape == (num_clients, size)
    flat = sets.dims.flatten().tolist()
    assert len(set(flat)) == len(flat)
    assert min(flat) >= 0 and max(flat) < 512


def test_scaling_sets_come_from_the_seed() -> None:
    a = draw_scaling_sets(embed_dim=64, num_clients=4, seed=1)
    b = draw_scaling_sets(embed_dim=64, num_clients=4, seed=1)
    c = draw_scaling_sets(embed_dim=64, num_clients=4, seed=2)
    assert torch.equal(a.dims, b.dims) and torch.equal(a.basis, b.basis)
    assert not torch.equal(a.dims, c.dims)
    torch.testing.assert_close(a.basis.T @ a.basis, torch.eye(64), atol=1e-5, rtol=0)


def test_scale_vector_is_alpha_on_the_clients_dimensions() -> None:
    sets = draw_scaling_sets(embed_dim=20, num_clients=4, seed=0)
    scale = sets.scale(2, 10.0)
    assert sorted(torch.nonzero(scale == 10.0).flatten().tolist()) == sorted(sets.dims[2].tolist())
    assert int((scale == 1.0).sum()) == 20 - 5


def test_more_clients_than_dimensions_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at least one embedding dimension per client"):
        draw_scaling_sets(embed_dim=8, num_clients=9, seed=0)


class TinyModel(nn.Module):
    """h = W x (flattened), z = V h: enough to exercise the methods' losses."""

    def __init__(self, dim: int = 16, feature_dim: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, feature_dim))
        self.projector = nn.Linear(feature_dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return h, self.projector(h)


def views(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(32, 3, 4, 4, generator=g), torch.rand(32, 3, 4, 4, generator=g)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_honours_the_protocol(name: str) -> None:
    """Built with default options on a real (tiny) model: a finite scalar loss with gradients,
    named detached parts, an aggregate (the method's or the default FedAvg) that returns every
    entry of the global state, and a server state that loads back."""
    from fedssd.experiment import attach_extras
    from fedssd.federation.simulator import local_keys
    from fedssd.methods.protocol import ClientHooks

    torch.manual_seed(0)
    model = build_model(encoder="small_cnn", width=4, projector_hidden=32, projector_out=None)
    method = build_method(
        name, {}, method_context(feature_dim=model.feature_dim, embed_dim=model.embed_dim)
    )
    attach_extras(model, method, seed=0)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    if isinstance(method, ClientHooks):
        method.begin_client(model, None, client_id=1, round_index=1)
    g = torch.Generator().manual_seed(0)
    view1, view2 = torch.rand(16, 3, 32, 32, generator=g), torch.rand(16, 3, 32, 32, generator=g)
    loss, parts = method.local_loss(model, view1, view2, client_id=1, position=0)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert parts and all(not p.requires_grad for p in parts.values())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    payload: dict[str, torch.Tensor] = {}
    if isinstance(method, ClientHooks):
        method.after_step(model)
        _, payload = method.end_client(model, None, client_id=1, round_index=1)
    local = local_keys(model, method)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in local}
    updates = [ClientUpdate(1, state, 2.0, payload), ClientUpdate(1, state, 1.0, payload)]
    new_state = aggregate_updates(method, global_state, updates, round_index=1)
    assert new_state.keys() == global_state.keys()
    saved = server_state(method)
    load_server_state(method, saved)
    assert server_state(method).keys() == saved.keys()


def test_ssd_parts_and_ablation_switches() -> None:
    model = TinyModel()
    full = build_method("ssd", {}, method_context())
    _, parts = full.local_loss(model, *views(), client_id=1, position=0)
    assert set(parts) == {"align", "uniform", "dsr", "pd"}
    only_pd = build_method("ssd", {"dsr": False}, method_context())
    assert set(only_pd.local_loss(model, *views(), client_id=1, position=0)[1]) == {
        "align",
        "uniform",
        "pd",
    }
    only_dsr = build_method("ssd", {"pd": False}, method_context())
    assert "pd" not in only_dsr.local_loss(model, *views(), client_id=1, position=0)[1]


def test_ssd_without_dsr_and_pd_is_fedalignuniform() -> None:
    torch.manual_seed(0)
    model = TinyModel()
    base = build_method("fedalignuniform", {}, method_context())
    ssd = build_method("ssd", {"dsr": False, "pd": False}, method_context())
    a, _ = base.local_loss(model, *views(), client_id=0, position=0)
    b, _ = ssd.local_loss(model, *views(), client_id=0, position=0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_ssd_total_is_the_weighted_sum_of_its_parts() -> None:
    ssd = build_method("ssd", {}, method_context())
    loss, parts = ssd.local_loss(TinyModel(), *views(), client_id=2, position=0)
    expected = parts["align"] + parts["uniform"] + 1.0 * parts["dsr"] + 0.1 * parts["pd"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dsr_keying_by_client_id_or_by_position() -> None:
    model = TinyModel()
    by_id = build_method("ssd", {"pd": False}, method_context())
    by_position = build_method("ssd", {"pd": False, "dsr_keying": "position"}, method_context())
    v = views()
    dsr_id = by_id.local_loss(model, *v, client_id=3, position=0)[1]["dsr"]
    dsr_pos_same = by_position.local_loss(model, *v, client_id=0, position=3)[1]["dsr"]
    dsr_pos_other = by_position.local_loss(model, *v, client_id=3, position=0)[1]["dsr"]
    assert dsr_id.item() == pytest.approx(dsr_pos_same.item())
    assert dsr_id.item() != pytest.approx(dsr_pos_other.item())


def test_pd_needs_equal_widths() -> None:
    with pytest.raises(ConfigError, match="projector distillation needs"):
        SSD(SSDOptions(), method_context(feature_dim=16, embed_dim=8))
    SSD(SSDOptions(pd=False), method_context(feature_dim=16, embed_dim=8))


def _train_steps(
    method_name: str, options: dict[str, object], steps: int = 30
) -> list[dict[str, float]]:
    """Loss parts before and after ``steps`` SGD steps on a fixed pair of views."""
    torch.manual_seed(0)
    model = TinyModel()
    method = build_method(method_name, options, method_context())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    v = views(1)
    history = []
    for _ in range(steps + 1):
        loss, parts = method.local_loss(model, *v, client_id=0, position=0)
        history.append({"loss": loss.item(), **{k: p.item() for k, p in parts.items()}})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [history[0], history[-1]]


@pytest.mark.parametrize(
    ("name", "options"),
    [("fedalignuniform", {}), ("ssd", {"dsr_form": "released"}), ("ssd", {"dsr": False})],
)
def test_a_few_steps_lower_the_loss(name: str, options: dict[str, object]) -> None:
    first, last = _train_steps(name, options)
    assert last["loss"] < first["loss"] - 0.05


def test_paper_dsr_pulls_embeddings_onto_the_clients_dimensions() -> None:
    """The paper's DSR has a stop-gradient target ``z * d``: its gradient moves mass onto the
    client's dimensions, which makes the value ``(alpha - 1)^2 * mass`` grow, not fall."""
    first, last = _train_steps("ssd", {"pd": False, "dsr_form": "paper"})
    mass_first = first["dsr"] / 81.0
    mass_last = last["dsr"] / 81.0
    assert mass_last > mass_first + 0.2
    assert last["align"] < first["align"]


def test_resolve_options_fills_defaults() -> None:
    options = resolve_options("ssd", {"dsr_alpha": 5})
    assert options.dsr_alpha == 5.0 and options.pd_temperature == 0.5
    with pytest.raises(ConfigError, match="unknown method"):
        resolve_options("simclr", {})


def test_options_shared_between_methods() -> None:
    from fedssd.methods import shared_options

    ssd_options = {"uniformity_weight": 0.5, "dsr_form": "paper", "pd": False}
    assert shared_options("fedalignuniform", ssd_options) == {"uniformity_weight": 0.5}
    assert shared_options("ssd", ssd_options) == ssd_options


@pytest.mark.parametrize("options", [{}, {"dsr_form": "paper"}, {"pd_form": "mse"}])
def test_ssd_loss_is_symmetric_in_the_two_views(options: dict[str, object]) -> None:
    """Every term is averaged over (or symmetric in) the two views."""
    torch.manual_seed(0)
    model = TinyModel()
    method = build_method("ssd", options, method_context())
    v1, v2 = views(3)
    loss_a, parts_a = method.local_loss(model, v1, v2, client_id=1, position=0)
    loss_b, parts_b = method.local_loss(model, v2, v1, client_id=1, position=0)
    assert loss_a.item() == pytest.approx(loss_b.item(), rel=1e-5)
    for name in parts_a:
        assert parts_a[name].item() == pytest.approx(parts_b[name].item(), rel=1e-5, abs=1e-7)


def test_pd_only_ablation_needs_no_scaling_sets() -> None:
    method = build_method("ssd", {"dsr": False}, method_context(num_clients=40))
    assert server_state(method) == {}
    with pytest.raises(ConfigError, match="embedding dimension per client"):
        build_method("ssd", {}, method_context(num_clients=40))


class _LossOnly:
    """A method with only ``local_loss``: FedAvg and no server state by default."""

    def local_loss(
        self, model: nn.Module, view1: torch.Tensor, view2: torch.Tensor, **_: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.zeros(()), {}


class _OwnRule(_LossOnly):
    """A method with its own aggregate and server state (records what it was given)."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.table = torch.tensor([1.0, 2.0])

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        *,
        round_index: int,
    ) -> dict[str, torch.Tensor]:
        self.seen.append(round_index)
        return {k: v + 1 for k, v in global_state.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"table": self.table.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.table = state["table"].clone()


def test_aggregate_updates_defaults_to_fedavg_keeping_local_entries() -> None:
    """By hand: weights 3 and 1 give (3 * [1, 2] + [5, -2]) / 4 = [2, 1]; the integer counter
    (3 * 4 + 8) / 4 = 5; ``extras.local.w`` (sent by no client) stays the global value, and
    the result keeps global_state's key order."""
    global_state = {
        "encoder.w": torch.tensor([0.0, 0.0]),
        "extras.local.w": torch.tensor([7.0]),
        "encoder.n": torch.tensor(0),
    }
    updates = [
        ClientUpdate(0, {"encoder.w": torch.tensor([1.0, 2.0]), "encoder.n": torch.tensor(4)}, 3.0),
        ClientUpdate(
            1, {"encoder.w": torch.tensor([5.0, -2.0]), "encoder.n": torch.tensor(8)}, 1.0
        ),
    ]
    new = aggregate_updates(_LossOnly(), global_state, updates, round_index=0)
    assert list(new) == list(global_state)
    torch.testing.assert_close(new["encoder.w"], torch.tensor([2.0, 1.0]))
    assert new["encoder.n"].dtype == torch.int64 and int(new["encoder.n"]) == 5
    torch.testing.assert_close(new["extras.local.w"], torch.tensor([7.0]))


def test_aggregate_updates_uses_the_methods_own_rule() -> None:
    method = _OwnRule()
    new = aggregate_updates(
        method,
        {"w": torch.tensor([1.0])},
        [ClientUpdate(0, {"w": torch.tensor([9.0])}, 1.0)],
        round_index=4,
    )
    torch.testing.assert_close(new["w"], torch.tensor([2.0]))
    assert method.seen == [4]


def test_server_state_defaults_and_refusal() -> None:
    """A method without state saves {} and accepts {} back, but refuses another method's state;
    a method with state round-trips it."""
    plain = _LossOnly()
    assert server_state(plain) == {}
    load_server_state(plain, {})
    with pytest.raises(ConfigError, match=r"keeps none; resume only the run that wrote it\.$"):
        load_server_state(plain, {"table": torch.zeros(2)})
    own = _OwnRule()
    torch.testing.assert_close(server_state(own)["table"], torch.tensor([1.0, 2.0]))
    load_server_state(own, {"table": torch.tensor([3.0, 4.0])})
    torch.testing.assert_close(server_state(own)["table"], torch.tensor([3.0, 4.0]))


# --- capabilities and registration ------------------------------------------------------------


class _Loss:
    """A method with only the required part (a constant loss)."""

    def __init__(self, options: object, context: MethodContext) -> None:
        self.options = options

    def local_loss(
        self,
        model: nn.Module,
        view1: torch.Tensor,
        view2: torch.Tensor,
        *,
        client_id: int,
        position: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return torch.zeros(()), {}


class _ThreeHooks(_Loss):
    """begin_client, after_step and end_client but no local_modules: without the check the round
    loop's ``isinstance(method, ClientHooks)`` would be False and the hooks never run."""

    def begin_client(self, model: nn.Module, stored: object, **_: int) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass

    def end_client(self, model: nn.Module, stored: object, **_: int) -> tuple[object, dict]:  # type: ignore[type-arg]
        return None, {}


class _HalfState(_Loss):
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}


class _LocalList(_ThreeHooks):
    local_modules = ["predictor"]  # noqa: RUF012 - a list on purpose (not a frozenset)


@dataclasses.dataclass(frozen=True)
class _NoOptions:
    pass


def _spec(cls: type) -> MethodSpec:
    return MethodSpec(method=cls, options=_NoOptions, summary="test")


def test_a_partial_hook_set_fails_at_build_naming_the_missing_member() -> None:
    from fedssd.methods.protocol import ClientHooks

    assert not isinstance(
        _ThreeHooks(_NoOptions(), method_context()), ClientHooks
    )  # the silent case
    with pytest.raises(TypeError, match=r"ClientHooks but not local_modules;"):
        _spec(_ThreeHooks).build(_NoOptions(), method_context())
    with pytest.raises(TypeError, match=r"HasServerState but not load_state_dict;"):
        _spec(_HalfState).build(_NoOptions(), method_context())
    with pytest.raises(TypeError, match=r"local_modules must be a frozenset"):
        _spec(_LocalList).build(_NoOptions(), method_context())


def test_the_sample_order_is_a_declared_capability() -> None:
    from fedssd.federation.sampling import shuffled_order
    from fedssd.methods.protocol import OrdersSample

    class Ordered(_Loss):
        random_sample_order = True

    class Worded(_Loss):
        random_sample_order = "yes"

    ordered = _spec(Ordered).build(_NoOptions(), method_context())
    assert isinstance(ordered, OrdersSample) and shuffled_order(ordered)
    assert not isinstance(_spec(_Loss).build(_NoOptions(), method_context()), OrdersSample)
    with pytest.raises(TypeError, match=r"random_sample_order must be true or false"):
        _spec(Worded).build(_NoOptions(), method_context())


def test_a_complete_or_empty_capability_set_builds() -> None:
    class Hooks(_ThreeHooks):
        local_modules: frozenset[str] = frozenset()

    assert isinstance(_spec(_Loss).build(_NoOptions(), method_context()), _Loss)
    assert isinstance(_spec(Hooks).build(_NoOptions(), method_context()), Hooks)
    with pytest.raises(TypeError, match="must be a dataclass"):
        MethodSpec(method=_Loss, options=int, summary="")


def test_registry_lists_the_thirteen_methods_by_class_in_order() -> None:
    names = [
        "fedalignuniform", "ssd", "fedx", "ldawa", "feddecorr", "fedu2", "hsd",
        "fedsimclr", "fedsimsiam", "fedbyol", "fedu", "fedema", "orchestra",
    ]  # fmt: skip
    assert list(METHODS) == names
    for name, spec in METHODS.items():
        assert isinstance(spec.method, type), name
        assert spec.method.__module__ == f"fedssd.methods.{name}", name
        assert dataclasses.is_dataclass(spec.options), name


def test_ssd_and_hsd_refuse_each_others_or_another_runs_sets() -> None:
    ssd = build_method("ssd", {"pd": False}, method_context())
    hsd = build_method("hsd", {}, method_context())
    saved_ssd, saved_hsd = server_state(ssd), server_state(hsd)
    assert set(saved_ssd) == {"dsr_dims", "dsr_basis"}
    assert set(saved_hsd) == {"hsd_dims", "hsd_basis"}
    assert torch.equal(saved_ssd["dsr_dims"], saved_hsd["hsd_dims"])  # the same draw
    load_server_state(ssd, saved_ssd)
    load_server_state(hsd, saved_hsd)
    with pytest.raises(ConfigError, match="checkpoint's SSD scaling sets differ"):
        load_server_state(ssd, saved_hsd)
    with pytest.raises(ConfigError, match="checkpoint's HSD subspaces differ"):
        load_server_state(hsd, {**saved_hsd, "hsd_dims": saved_hsd["hsd_dims"].flip(0)})
