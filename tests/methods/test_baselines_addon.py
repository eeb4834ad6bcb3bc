"""SSD-table baselines as add-ons to FedAlignUniform: FedX, L-DAWA, FedDecorr, FedU2, HSD.

Pin tests follow each method's paper and the pins listed in docs/methods.md ("Tests"); the
rest checks that each method's loss falls on real Fashion-MNIST images and that each runs
through the CLI in the cross-silo and the cross-device setting.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedssd import losses
from fedssd.cli import main
from fedssd.data.augment import AugmentConfig, two_views
from fedssd.data.datasets import load_dataset
from fedssd.errors import ConfigError
from fedssd.methods import MethodContext, build_method
from fedssd.methods.feddecorr import decorrelation_loss
from fedssd.methods.fedu2 import (
    FedU2,
    FedU2Options,
    eua_famo,
    eua_mgda,
    flexible_uniform_regularizer,
    min_norm_weights,
    project_to_simplex,
    sliced_wasserstein,
    sphere_log,
)
from fedssd.methods.fedx import HEAD, FedX, FedXOptions, nt_xent, relational_loss
from fedssd.methods.hsd import hard_separated_embedding, subspace_basis
from fedssd.methods.ldawa import LDAWA, LDAWAOptions, layer_weights, ldawa_average, module_weights
from fedssd.methods.protocol import ClientHooks, ClientUpdate
from fedssd.methods.ssd import draw_scaling_sets
from fedssd.models import build_model
from fedssd.runs.store import ClientStore
from helpers import method_context

ADDONS = ["fedx", "ldawa", "feddecorr", "fedu2", "hsd"]
FASHION = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------ FedX


def test_ntxent_pin() -> None:
    """tau = 1, a = b = (e1, e2): every row's loss is log(1 + 2/e)."""
    e = torch.eye(2)
    assert nt_xent(e, e, 1.0).item() == pytest.approx(math.log(1 + 2 / math.e), abs=1e-6)
    assert nt_xent(e, e, 1.0).item() == pytest.approx(0.551445, abs=1e-6)


def test_relational_loss_pin() -> None:
    """a = e1, a' = e2, r = (e1, e2), both temperatures 1: 0.120115; a' = a gives 0."""
    a, a2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    r = torch.eye(2)
    value = relational_loss(a, a2, r, temperature=1.0, target_temperature=1.0)
    assert value.item() == pytest.approx(0.120115, abs=1e-6)
    same = relational_loss(a, a, r, temperature=1.0, target_temperature=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-7)


def _fedx_model() -> tuple[nn.Module, FedX]:
    torch.manual_seed(0)
    model = build_model(encoder="small_cnn", width=4, projector_hidden=16, projector_out=None)
    method = FedX(FedXOptions(), _context(model))
    for name, module in method.extra_modules().items():
        model.extras[name] = module
    return model, method


def _context(model: nn.Module, num_clients: int = 4) -> MethodContext:
    return method_context(
        num_clients,
        feature_dim=int(model.feature_dim),  # type: ignore[arg-type]
        embed_dim=int(model.embed_dim),  # type: ignore[arg-type]
    )


def test_fedx_global_terms_train_q_and_never_the_teacher() -> None:
    model, method = _fedx_model()
    method.begin_client(model, None, client_id=0, round_index=0)
    assert method.teacher is not None and not method.teacher.training
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.rand(8, 3, 32, 32, generator=g), torch.rand(8, 3, 32, 32, generator=g)
    _, parts = method.local_loss(model, v1, v2, client_id=0, position=0)
    assert {"align", "uniform", "local_rel", "global_con", "global_rel"} == set(parts)
    # Backward of the two global terms alone, recomputed from the pieces the loss uses.
    _, u = model(torch.cat([v1, v2, v1]))
    head = model.get_submodule(f"extras.{HEAD}")
    p1, p2 = head(u[:8]), head(u[8:16])
    with torch.no_grad():
        _, teacher = method.teacher(torch.cat([v2, v1]))
    loss = nt_xent(p1, teacher[:8], 0.1) + relational_loss(
        p1, p2, teacher[8:], temperature=0.1, target_temperature=0.1
    )
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_fedx_teacher_is_one_module_reloaded_from_each_global() -> None:
    """Stateless clients: the teacher is the freshly received global model every time."""
    model, method = _fedx_model()
    method.begin_client(model, None, client_id=3, round_index=0)
    teacher = method.teacher
    state, payload = method.end_client(model, None, client_id=3, round_index=0)
    assert state.tensors == {} and payload == {}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a new global model arrives
    method.begin_client(model, None, client_id=5, round_index=1)
    assert method.teacher is teacher  # reused, not copied again
    assert teacher is not None
    for key, value in model.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_fedx_switches() -> None:
    model, _ = _fedx_model()
    keep = FedX(FedXOptions(keep_local_ntxent=True, separate_bn_pass=True), _context(model))
    keep.begin_client(model, None, client_id=0, round_index=0)
    v = torch.rand(2, 6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    loss, parts = keep.local_loss(model, v[0], v[1], client_id=0, position=0)
    assert "local_con" in parts
    total = sum(parts[k] for k in ("align", "uniform", "local_rel", "global_con", "global_rel"))
    assert loss.item() == pytest.approx((total + parts["local_con"]).item(), rel=1e-5)
    with pytest.raises(RuntimeError, match="begin_client"):
        FedX(FedXOptions(), _context(model)).local_loss(model, v[0], v[1], client_id=0, position=0)


# ---------------------------------------------------------------------------- L-DAWA

GLOBAL = {"encoder.l1": torch.tensor([1.0, 0.0]), "encoder.l2": torch.tensor([0.0, 1.0])}
CLIENT_A = {"encoder.l1": torch.tensor([2.0, 0.0]), "encoder.l2": torch.tensor([0.0, 3.0])}
CLIENT_B = {"encoder.l1": torch.tensor([0.0, 1.0]), "encoder.l2": torch.tensor([1.0, 1.0])}


def test_ldawa_per_layer_weights_by_hand() -> None:
    weights = layer_weights(GLOBAL, [CLIENT_A, CLIENT_B])
    assert weights[0] == {"encoder.l1": pytest.approx(1.0), "encoder.l2": pytest.approx(1.0)}
    assert weights[1]["encoder.l1"] == pytest.approx(0.0, abs=1e-12)
    assert weights[1]["encoder.l2"] == pytest.approx(1 / math.sqrt(2))
    new = ldawa_average(GLOBAL, [CLIENT_A, CLIENT_B], weights)
    torch.testing.assert_close(new["encoder.l1"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(new["encoder.l2"], torch.tensor([0.353553, 1.853553]))


def test_ldawa_per_module_and_fedavg_differ_as_computed_by_hand() -> None:
    weights = module_weights(GLOBAL, [CLIENT_A, CLIENT_B])
    assert weights[0]["encoder.l1"] == pytest.approx(0.980581, abs=1e-6)
    assert weights[1]["encoder.l2"] == pytest.approx(0.408248, abs=1e-6)
    new = ldawa_average(GLOBAL, [CLIENT_A, CLIENT_B], weights)
    torch.testing.assert_close(new["encoder.l1"], torch.tensor([0.980581, 0.204124]))
    torch.testing.assert_close(new["encoder.l2"], torch.tensor([0.204124, 1.674995]))
    updates = [ClientUpdate(0, CLIENT_A, 5.0), ClientUpdate(1, CLIENT_B, 5.0)]
    warm = LDAWA(LDAWAOptions(), _tiny_context()).aggregate(GLOBAL, updates, round_index=2)
    torch.testing.assert_close(warm["encoder.l1"], torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(warm["encoder.l2"], torch.tensor([0.5, 2.0]))
    after = LDAWA(LDAWAOptions(), _tiny_context()).aggregate(GLOBAL, updates, round_index=3)
    torch.testing.assert_close(after["encoder.l2"], torch.tensor([0.353553, 1.853553]))
    per_module = LDAWA(LDAWAOptions(mode="per_module"), _tiny_context())
    module_result = per_module.aggregate(GLOBAL, updates, round_index=3)
    torch.testing.assert_close(module_result["encoder.l1"], torch.tensor([0.980581, 0.204124]))


def test_ldawa_guards_renormalisation_and_integer_entries() -> None:
    reference = {"bias": torch.zeros(2), "count": torch.tensor(4), "w": torch.tensor([1.0, 0.0])}
    a = {"bias": torch.tensor([1.0, 1.0]), "count": torch.tensor(10), "w": torch.tensor([1.0, 1.0])}
    b = {
        "bias": torch.tensor([3.0, 1.0]),
        "count": torch.tensor(13),
        "w": torch.tensor([-1.0, 0.0]),
    }
    weights = layer_weights(reference, [a, b])
    assert weights[0]["bias"] == 1.0 and weights[0]["count"] == 1.0  # undefined cosine -> 1
    assert weights[1]["w"] == pytest.approx(-1.0)  # no lower clip: the sign flips
    plain = ldawa_average(reference, [a, b], weights)
    torch.testing.assert_close(plain["bias"], torch.tensor([2.0, 1.0]))
    assert plain["count"].dtype == torch.int64 and int(plain["count"]) == 12  # 11.5 rounds to 12
    # w: (1/sqrt2 * (1, 1) + (-1) * (-1, 0)) / 2, and renormalised by (1/sqrt2 - 1).
    scaled = torch.tensor([1 / math.sqrt(2) + 1, 1 / math.sqrt(2)])
    torch.testing.assert_close(plain["w"], scaled / 2)
    renorm = ldawa_average(reference, [a, b], weights, renormalize=True)
    torch.testing.assert_close(renorm["w"], scaled / (1 / math.sqrt(2) - 1))


# ------------------------------------------------------------------------- FedDecorr


@pytest.mark.parametrize(
    ("rows", "code", "paper"),
    [([[1, 0], [0, 1], [-1, -1]], 1 / 3, 0.625), ([[1, 1], [2, 2], [3, 3]], 4 / 3, 1.0)],
)
def test_decorrelation_on_known_matrices(
    rows: list[list[float]], code: float, paper: float
) -> None:
    x = torch.tensor(rows, dtype=torch.float32)
    assert decorrelation_loss(x).item() == pytest.approx(code, rel=1e-6)
    assert decorrelation_loss(x, form="paper").item() == pytest.approx(paper, rel=1e-6)


def test_decorrelation_equals_scaled_mean_squared_correlation() -> None:
    """Code form = ((N-1)^2 / N) * mean_{i != j} rho_ij^2 (docs/methods.md); N = 1 gives 0."""
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rho = torch.corrcoef(x.T)
    off = rho[~torch.eye(5, dtype=torch.bool)]
    expected = (19**2 / 20) * off.pow(2).mean()
    assert decorrelation_loss(x, eps=0.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert decorrelation_loss(torch.ones(1, 4)).item() == 0.0


# ----------------------------------------------------------------------------- FedU2


def test_sphere_log_known_cases() -> None:
    b = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(
        sphere_log(b, torch.tensor([0.0, 1.0, 0.0])), torch.tensor([0.0, math.pi / 2, 0.0])
    )
    y = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    torch.testing.assert_close(sphere_log(b, y), torch.tensor([0.0, math.pi / 4, 0.0]))
    # Antipodal and coincident points stay finite (the cosine is kept off +-1).
    assert torch.isfinite(sphere_log(b, -b)).all() and torch.isfinite(sphere_log(b, b)).all()


def test_sliced_wasserstein_one_dimension() -> None:
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0], [1.0]])
    assert sliced_wasserstein(x, y, torch.ones(1, 1)).item() == pytest.approx(2.5)


def test_fur_is_zero_on_its_own_reference_and_matches_a_loop() -> None:
    z = losses.normalize(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)))
    assert flexible_uniform_regularizer(z, reference=z).item() == pytest.approx(0.0, abs=1e-10)
    fast = flexible_uniform_regularizer(z, generator=torch.Generator().manual_seed(5))
    # Reference: the same draws (in the same order), one base point at a time.
    g = torch.Generator().manual_seed(5)
    u = losses.normalize(torch.randn(12, 6, generator=g))
    bases = losses.normalize(torch.randn(12, 6, generator=g))
    directions = torch.randn(12, 6, 6, generator=g)
    slow = sum(
        sliced_wasserstein(sphere_log(b, u), sphere_log(b, z), d)
        for b, d in zip(bases, directions, strict=True)
    )
    assert fast.item() == pytest.approx(float(slow) / 6, rel=1e-5)
    fixed = flexible_uniform_regularizer(z, generator=g, base_points=6, normaliser=6.0)
    assert fixed.item() > 0


def test_min_norm_weights_two_vectors_closed_form() -> None:
    v = torch.tensor([[2.0, 0.0], [1.2, 1.6]], dtype=torch.float64)  # both of length 2
    gram = v @ v.T
    c = min_norm_weights(gram, torch.tensor([0.9, 0.1], dtype=torch.float64))
    # c_1 = <v2 - v1, v2> / ||v1 - v2||^2 = (4 - 2.4) / (4 + 4 - 4.8) = 0.5.
    torch.testing.assert_close(c, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # One vector inside the other's half-space beyond it: the shorter one wins outright.
    w = torch.tensor([[1.0, 0.0], [3.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(
        min_norm_weights(w @ w.T, torch.tensor([0.5, 0.5], dtype=torch.float64)),
        torch.tensor([1.0, 0.0], dtype=torch.float64),
    )


@pytest.mark.parametrize(
    ("rule", "weights", "expected"),
    [
        # FedU2's released solver (Liao et al., CVPR 2024; docs/methods.md): c = pi = (3/4, 1/4)
        # is returned unchanged, g = 0.75 (2, 0) + 0.25 (0, 2) = (1.5, 0.5), theta = -0.5 g.
        ("released", (0.75, 0.25), (-0.75, -0.25)),
        # Exact min-norm of two orthogonal vectors of equal length: c = (1/2, 1/2), g = (1, 1).
        ("exact", (0.5, 0.5), (-0.5, -0.5)),
    ],
)
def test_two_client_rule_of_eua(
    rule: str, weights: tuple[float, float], expected: tuple[float, float]
) -> None:
    """Two accepted updates with deviations (2, 0) and (0, 4) and data weights 3 : 1."""
    context = MethodContext(
        num_clients=2, feature_dim=4, embed_dim=4, seed=0, device=torch.device("cpu")
    )
    method = build_method("fedu2", {"two_client_rule": rule, "server_lr": 0.5}, context)
    assert isinstance(method, FedU2)
    if rule == "released":
        assert FedU2Options().two_client_rule == "released"  # the default follows the code
    updates = [
        ClientUpdate(0, {"w": torch.tensor([-2.0, 0.0])}, 3.0),
        ClientUpdate(1, {"w": torch.tensor([0.0, -4.0])}, 1.0),
    ]
    new = method.aggregate({"w": torch.zeros(2)}, updates, round_index=0)
    torch.testing.assert_close(new["w"], torch.tensor(expected))
    pi = torch.tensor([0.75, 0.25], dtype=torch.float64)
    _, c = eua_mgda(
        {"w": torch.zeros(2)},
        [u.state for u in updates],
        pi,
        server_lr=0.5,
        parameter_keys={"w"},
        two_client_rule=rule,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(c, torch.tensor(weights, dtype=torch.float64))
    with pytest.raises(ConfigError, match="two_client_rule"):
        FedU2Options(two_client_rule="closest")  # type: ignore[arg-type]


def test_min_norm_weights_match_a_grid_search() -> None:
    v = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gram = v @ v.T
    c = min_norm_weights(gram, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert c.min() >= 0 and c.sum().item() == pytest.approx(1.0)
    grid = torch.tensor(
        [(a, b, 1 - a - b) for a, b in itertools.product(np.linspace(0, 1, 201), repeat=2)
         if a + b <= 1 + 1e-12],
        dtype=torch.float64,
    )  # fmt: skip
    best = float(((grid @ v).pow(2).sum(dim=1)).min())
    assert float(c @ gram @ c) <= best + 1e-6
    torch.testing.assert_close(
        project_to_simplex(torch.tensor([0.5, 0.5, 2.0])), torch.tensor([0.0, 0.0, 1.0])
    )


def test_eua_mgda_three_orthogonal_deviations() -> None:
    reference = {"w": torch.zeros(3), "bn.running_mean": torch.zeros(3)}
    states = [
        {"w": -torch.tensor([3.0, 0.0, 0.0]), "bn.running_mean": torch.ones(3)},
        {"w": -torch.tensor([0.0, 4.0, 0.0]), "bn.running_mean": 2 * torch.ones(3)},
        {"w": -torch.tensor([0.0, 0.0, 5.0]), "bn.running_mean": 4 * torch.ones(3)},
    ]
    pi = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    new, c = eua_mgda(reference, states, pi, server_lr=0.5, parameter_keys={"w"})
    torch.testing.assert_close(c, torch.full((3,), 1 / 3, dtype=torch.float64))
    # theta_g - eta * (2/3) (1,1,1) with d_k = theta_g - theta_k = +(3,0,0) etc.
    torch.testing.assert_close(new["w"], torch.full((3,), -0.5 * 2 / 3))
    torch.testing.assert_close(new["bn.running_mean"], torch.full((3,), 0.7 + 0.4 + 0.4))


def test_eua_famo_pin_and_logits_keyed_by_client_id() -> None:
    reference = {"w": torch.tensor([0.0])}
    states = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
    pi = torch.tensor([0.5, 0.5], dtype=torch.float64)
    new, logits, w = eua_famo(
        reference,
        states,
        pi,
        torch.zeros(2),
        server_lr=0.5,
        logit_lr=0.01,
        decay=0.01,
        parameter_keys={"w"},
    )
    torch.testing.assert_close(w, torch.tensor([0.9, 0.1], dtype=torch.float64))
    assert new["w"].item() == pytest.approx(1.2)
    # delta = log(1/0.04) vs log(9/3.24): the client that improved more loses weight.
    assert logits[0] < 0 < logits[1]
    tiny = MethodContext(
        num_clients=6, feature_dim=1, embed_dim=1, seed=0, device=torch.device("cpu")
    )
    method = FedU2(FedU2Options(aggregator="famo"), tiny)
    updates = [ClientUpdate(4, states[0], 1.0), ClientUpdate(1, states[1], 1.0)]
    method.aggregate(reference, updates, round_index=0)
    saved = method.state_dict()["famo_logits"]
    assert saved[4] < 0 < saved[1] and saved[[0, 2, 3, 5]].abs().sum() == 0
    # Next round the same clients come in the other order: their logits follow their ids.
    restored = FedU2(FedU2Options(aggregator="famo"), tiny)
    restored.load_state_dict({"famo_logits": saved})
    swapped = [ClientUpdate(1, states[1], 1.0), ClientUpdate(4, states[0], 1.0)]
    restored.aggregate(reference, swapped, round_index=1)
    assert restored.state_dict()["famo_logits"][4] < saved[4]


# ------------------------------------------------------------------------------- HSD


def test_hsd_pin_two_axis_subspaces() -> None:
    """d = 2, identity basis, A = span(e1), B = span(e2): every A-B pair is at distance^2 2."""
    basis = torch.eye(2)
    u = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    za = hard_separated_embedding(u, subspace_basis(basis, torch.tensor([0])))
    zb = hard_separated_embedding(u + 0.3, subspace_basis(basis, torch.tensor([1])))
    assert torch.allclose(za.abs(), torch.tensor([1.0, 0.0]).expand(5, 2))
    assert torch.allclose(zb.abs(), torch.tensor([0.0, 1.0]).expand(5, 2))
    torch.testing.assert_close(torch.cdist(za, zb).pow(2), torch.full((5, 5), 2.0))


def test_hsd_projection_keeps_only_the_clients_own_dimensions() -> None:
    sets = draw_scaling_sets(embed_dim=24, num_clients=4, seed=3)
    u = torch.randn(7, 24, generator=torch.Generator().manual_seed(1))
    for k in range(4):
        z = hard_separated_embedding(u, subspace_basis(sets.basis, sets.dims[k]))
        coordinates = z @ sets.basis  # coordinates in the rotated basis
        others = [i for i in range(24) if i not in set(sets.dims[k].tolist())]
        assert coordinates[:, others].abs().max() < 1e-5
        torch.testing.assert_close(z.norm(dim=1), torch.ones(7))
    z0 = hard_separated_embedding(u, subspace_basis(sets.basis, sets.dims[0]))
    z1 = hard_separated_embedding(u, subspace_basis(sets.basis, sets.dims[1]))
    assert (z0 @ z1.T).abs().max() < 1e-5


def test_hsd_subspace_follows_the_client_id() -> None:
    model = build_model(encoder="small_cnn", width=4, projector_hidden=16, projector_out=None)
    method = build_method("hsd", {}, _context(model))
    by_position = build_method("hsd", {"hsd_keying": "position"}, _context(model))
    v = torch.rand(2, 6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()  # BatchNorm in eval: identical forward passes
    a = method.local_loss(model, v[0], v[1], client_id=2, position=0)[0]
    b = method.local_loss(model, v[0], v[1], client_id=2, position=3)[0]
    c = by_position.local_loss(model, v[0], v[1], client_id=0, position=2)[0]
    d = method.local_loss(model, v[0], v[1], client_id=1, position=0)[0]
    assert a.item() == b.item() == pytest.approx(c.item())
    assert a.item() != pytest.approx(d.item())


# -------------------------------------------------------------- real data and the CLI


@pytest.fixture(scope="module")
def fashion_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 training and 100 test images of the real Fashion-MNIST, as an .npz (fast to load)."""
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST is not installed in {FASHION}; run `make data`.")
    root = tmp_path_factory.mktemp("fashion")
    data = load_dataset("fashion_mnist", root=root, download=False, pad_to_32=False, rgb=False)
    rng = np.random.default_rng(0)
    train = rng.choice(data.x_train.shape[0], 400, replace=False)
    test = rng.choice(data.x_test.shape[0], 100, replace=False)
    path = root / "fashion_small.npz"
    np.savez(
        path,
        x_train=data.x_train[train, 0].numpy(),
        y_train=data.y_train[train].numpy(),
        x_test=data.x_test[test, 0].numpy(),
        y_test=data.y_test[test].numpy(),
    )
    return path


@pytest.mark.parametrize("name", ADDONS)
def test_loss_falls_on_real_images(name: str, fashion_npz: Path) -> None:
    with np.load(fashion_npz) as stored:
        images = torch.from_numpy(stored["x_train"][:32]).unsqueeze(1).expand(-1, 3, -1, -1)
    images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    views = two_views(images, AugmentConfig(), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model(encoder="small_cnn", width=4, projector_hidden=32, projector_out=None)
    method = build_method(name, {}, _context(model))
    for key, module in getattr(method, "extra_modules", dict)().items():
        model.extras[key] = module
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9
    )
    if isinstance(method, ClientHooks):
        # FedX's teacher is the model at the start, as in a client's round.
        method.begin_client(model, None, client_id=1, round_index=0)
    history = []
    for _ in range(10):
        loss, _ = method.local_loss(model, *views, client_id=1, position=0)
        history.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(math.isfinite(x) for x in history)
    assert np.mean(history[-3:]) < history[0] - 0.05, history


FAST = [
    "--set", "data.train_subset=120", "--set", "data.test_subset=0", "--set", "data.alpha=0.5",
    "--set", "model.width=4", "--set", "model.projector_hidden=32",
    "--set", "federation.batch_size=32", "--set", "evaluation.every=0",
    "--set", "evaluation.linear_epochs=1", "--set", "evaluation.metrics_samples=100",
    "--set", "evaluation.metrics_per_client=20", "--set", "evaluation.knn_k=5",
]  # fmt: skip


def _train(
    tmp_path: Path, npz: Path, name: str, clients: int, fraction: float, rounds: int, *extra: str
) -> Path:
    out = tmp_path / f"{name}_{clients}"
    code = main([
        "train", "--config", "src/fedssd/configs/smoke.toml", "--set", f"method.name={name}",
        "--set", "data.name=npz", "--set", f"data.path={npz}",
        "--set", f"federation.num_clients={clients}", "--set", f"federation.fraction={fraction}",
        "--set", f"federation.rounds={rounds}", *FAST, *extra, "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert code == 0
    return out


@pytest.mark.parametrize("name", ADDONS)
def test_two_rounds_through_the_cli_in_both_settings(
    name: str, fashion_npz: Path, tmp_path: Path
) -> None:
    silo = _train(tmp_path, fashion_npz, name, 2, 1.0, 2)
    summary = json.loads((silo / "summary.json").read_text())
    assert summary["method"] == name and math.isfinite(summary["knn_acc"])
    device = _train(tmp_path, fashion_npz, name, 6, 0.5, 3)
    records = [json.loads(line) for line in (device / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(len(r["clients"]) == 3 for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (device / "summary.json").is_file()


def test_cross_device_famo_keeps_logits_of_the_sampled_client_ids(
    fashion_npz: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = _train(tmp_path, fashion_npz, "fedu2", 6, 0.5, 3, "--set", "method.aggregator=famo")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = {c for r in records for c in r["clients"]}
    logits = load_file(str(out / "server_state.safetensors"))["famo_logits"]
    assert logits.shape == (6,)
    assert all(logits[c] == 0 for c in range(6) if c not in seen)
    assert any(logits[c] != 0 for c in seen)


def test_hooks_keep_no_client_state_for_stateless_addons() -> None:
    """FedX and FedU2 clients keep nothing across rounds (docs/methods.md, "Per-client state")."""
    model, fedx = _fedx_model()
    store = ClientStore()
    for method in (fedx, FedU2(FedU2Options(), _context(model))):
        method.begin_client(model, store.get(2), client_id=2, round_index=0)
        kept, payload = method.end_client(model, store.get(2), client_id=2, round_index=0)
        store.put(2, kept)
        stored = store.get(2)
        assert payload == {} and stored is not None and stored.tensors == {}


def _tiny_context() -> MethodContext:
    return method_context(2, feature_dim=2, embed_dim=2)


@pytest.mark.parametrize("name", ADDONS)
@pytest.mark.parametrize(
    ("setting", "clients", "fraction"), [("silo", 10, 1.0), ("device", 50, 0.2)]
)
def test_paper_protocol_configs(name: str, setting: str, clients: int, fraction: float) -> None:
    from fedssd.methods import resolve_options
    from fedssd.runs.resolve import load_config

    config = load_config(f"{name}-{setting}")
    assert config.method.name == name and config.model.encoder == "resnet18"
    assert (config.federation.num_clients, config.federation.fraction) == (clients, fraction)
    defaults = resolve_options(name, {})
    assert resolve_options(name, config.method.options) == defaults  # the file spells defaults
