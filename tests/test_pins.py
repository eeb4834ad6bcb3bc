"""Pins on details that change results without breaking anything else.

Each test compares the code with a computation written out here, not with the code itself.
The mutations each test catches:

- ``test_ssd_pd_term_matches_the_formula_by_hand``: projector distillation's arguments swapped
  (``KL(softmax(h/T) || softmax(z/T))``), or fed the unit-norm z instead of the raw z.
- ``test_ssd_pd_gradient_matches_the_formula_by_hand``: the same two mutations, seen in the
  gradient reaching the encoder and the projector, and a stop-gradient on either side.
- ``test_local_sgd_update_has_momentum_and_weight_decay``: the local optimiser built with
  momentum 0 or weight decay 0 (in ``federation/client.py``), or the defaults of
  ``FederationConfig`` no longer the paper's (momentum 0.9, weight decay 1e-4).
- ``test_linear_probe_uses_feature_norms``: the linear probe normalising its features.
- ``test_extract_features_returns_raw_encoder_output``: feature extraction normalising h.
- ``test_evaluation_hands_raw_features_to_the_probe``: the final evaluation handing normalised
  features (or z) to the probe.
- ``test_batch_count_skips_single_sample_batches``: local training taking a step on a batch of
  one sample, or skipping batches it should train on (counted as optimizer steps).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from fedssd.config import EvaluationConfig, FederationConfig
from fedssd.data.augment import SSL_AUGMENT, to_float
from fedssd.evaluation.features import extract_features
from fedssd.evaluation.linear_probe import linear_probe
from fedssd.federation import client as client_module
from fedssd.federation import evaluate as evaluate_module
from fedssd.federation.client import LocalSettings, LocalSGD, local_train
from fedssd.methods import MethodContext, build_method
from fedssd.models import build_model
from helpers import method_context

_T = 0.5  # the paper's PD temperature
_DELTA = 0.1  # the paper's PD weight


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(encoder="small_cnn", width=4, projector_hidden=16, projector_out=None)


def _context(dim: int) -> MethodContext:
    return method_context(num_clients=2, feature_dim=dim, embed_dim=dim)


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 3, 32, 32, generator=g)


def _softmax_by_hand(x: torch.Tensor) -> torch.Tensor:
    shifted = x - x.max(dim=1, keepdim=True).values
    e = torch.exp(shifted)
    return e / e.sum(dim=1, keepdim=True)


def _pd_by_hand(h: torch.Tensor, z_raw: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)``, p = softmax(z_raw / T) the target, q = softmax(h / T), batch mean."""
    p = _softmax_by_hand(z_raw / _T)
    q = _softmax_by_hand(h / _T)
    return (p * (torch.log(p) - torch.log(q))).sum(dim=1).mean()


def _ssd_losses(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SSD's loss with PD, without PD, and PD by hand (mean over the two views)."""
    v1, v2 = _views()
    dim = int(model(v1)[0].shape[1])
    with_pd = build_method("ssd", {"dsr": False}, _context(dim))
    without_pd = build_method("ssd", {"dsr": False, "pd": False}, _context(dim))
    loss_on, _ = with_pd.local_loss(model, v1, v2, client_id=0, position=0)
    loss_off, _ = without_pd.local_loss(model, v1, v2, client_id=0, position=0)
    (h1, z1), (h2, z2) = model(v1), model(v2)
    # The raw outputs must differ enough from their unit-norm versions for the pin to bite.
    assert (z1.norm(dim=1) - 1).abs().min() > 0.1
    hand = (_pd_by_hand(h1, z1) + _pd_by_hand(h2, z2)) / 2
    return loss_on, loss_off, hand


def test_ssd_pd_term_matches_the_formula_by_hand() -> None:
    model = _tiny_model()
    loss_on, loss_off, hand = _ssd_losses(model)
    assert hand.item() > 1e-3
    torch.testing.assert_close(loss_on - loss_off, _DELTA * hand, rtol=1e-4, atol=1e-6)


def test_ssd_pd_gradient_matches_the_formula_by_hand() -> None:
    model = _tiny_model()
    loss_on, loss_off, hand = _ssd_losses(model)
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    projector = [p for n, p in model.named_parameters() if not n.startswith("encoder")]
    assert projector, "the model has no projector parameters"
    params = encoder + projector
    got = torch.autograd.grad(loss_on - loss_off, params, allow_unused=True)
    want = torch.autograd.grad(_DELTA * hand, params, allow_unused=True)
    for side, start, stop in (
        ("encoder", 0, len(encoder)),
        ("projector", len(encoder), len(params)),
    ):
        g = torch.cat(
            [
                (x if x is not None else torch.zeros_like(p)).flatten()
                for x, p in zip(got[start:stop], params[start:stop], strict=True)
            ]
        )
        w = torch.cat(
            [
                (x if x is not None else torch.zeros_like(p)).flatten()
                for x, p in zip(want[start:stop], params[start:stop], strict=True)
            ]
        )
        # No stop-gradient: both sides get a gradient from PD.
        assert w.norm() > 1e-6, side
        scale = float(w.abs().max())
        torch.testing.assert_close(
            g, w, rtol=1e-3, atol=1e-3 * scale, msg=f"PD gradient on the {side}"
        )


class _RecordingSGD(LocalSGD):
    made: ClassVar[list[_RecordingSGD]] = []
    steps: ClassVar[int] = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _RecordingSGD.made.append(self)

    def step(self) -> None:
        _RecordingSGD.steps += 1
        super().step()


@pytest.fixture
def recording_sgd(monkeypatch: pytest.MonkeyPatch) -> type[_RecordingSGD]:
    _RecordingSGD.made = []
    _RecordingSGD.steps = 0
    monkeypatch.setattr(client_module, "LocalSGD", _RecordingSGD)
    return _RecordingSGD


def _train(
    n: int,
    *,
    batch_size: int,
    epochs: int,
    settings_from: FederationConfig | None = None,
    after_step: Any = None,
    model: nn.Module | None = None,
) -> tuple[nn.Module, int]:
    model = model or _tiny_model()
    dim = int(model(torch.zeros(2, 3, 32, 32))[0].shape[1])
    method = build_method("ssd", {"dsr": False}, _context(dim))
    fed = settings_from or FederationConfig()
    settings = LocalSettings(
        epochs=epochs,
        batch_size=batch_size,
        lr=0.05,
        momentum=fed.momentum,
        weight_decay=fed.weight_decay,
        augment=SSL_AUGMENT,
    )
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(n, 1), 3, 32, 32), dtype=torch.uint8, generator=g)
    result = local_train(
        model,
        method,
        images,
        torch.arange(n),
        settings=settings,
        generator=torch.Generator().manual_seed(5),
        client_id=0,
        position=0,
        after_step=after_step,
    )
    return model, result.num_batches


def test_local_sgd_update_has_momentum_and_weight_decay(
    recording_sgd: type[_RecordingSGD],
) -> None:
    # The paper's values (SGD momentum 0.9, weight decay 1e-4), written out here.
    momentum, weight_decay, lr = 0.9, 1e-4, 0.05
    fed = FederationConfig()
    assert (fed.momentum, fed.weight_decay) == (momentum, weight_decay)
    model = _tiny_model()
    track: dict[str, Any] = {
        "before": [p.detach().clone() for p in model.parameters() if p.requires_grad],
        "buffers": None,
    }
    mismatches: list[str] = []

    def after_step(stepped: nn.Module) -> None:
        params = [p for p in stepped.parameters() if p.requires_grad]
        buffers = []
        for i, p in enumerate(params):
            old = track["before"][i]
            assert p.grad is not None
            d_p = p.grad.detach() + weight_decay * old
            buf = d_p if track["buffers"] is None else momentum * track["buffers"][i] + d_p
            if not torch.allclose(p.detach(), old - lr * buf, rtol=1e-5, atol=1e-7):
                mismatches.append(f"parameter {i}")
            buffers.append(buf)
        track["before"] = [p.detach().clone() for p in params]
        track["buffers"] = buffers

    _, steps = _train(12, batch_size=4, epochs=1, after_step=after_step, model=model)
    assert steps == 3
    assert not mismatches, mismatches[:5]
    (optimizer,) = recording_sgd.made
    settings = (optimizer.momentum, optimizer.weight_decay, optimizer.lr)
    assert settings == (momentum, weight_decay, lr)
    state = [optimizer.momentum_buffers[k] for k in range(len(optimizer.params))]
    for got, want in zip(state, track["buffers"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "expected"),
    # 8 = 4+4; 9 = 4+4+(1 skipped); 10 = 4+4+2 twice; 1 sample: nothing; 3 < 4: one batch.
    [(8, 4, 1, 2), (9, 4, 1, 2), (10, 4, 2, 6), (1, 4, 3, 0), (3, 4, 1, 1)],
)
def test_batch_count_skips_single_sample_batches(
    recording_sgd: type[_RecordingSGD], n: int, batch: int, epochs: int, expected: int
) -> None:
    _, reported = _train(n, batch_size=batch, epochs=epochs)
    assert recording_sgd.steps == expected
    assert reported == expected


def _norm_coded_features(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every feature on one direction; the class is only in the norm (1 or 3)."""
    labels = torch.arange(n) % 2
    direction = torch.tensor([0.6, 0.8])
    radius = 1.0 + 2.0 * labels.float()
    return radius[:, None] * direction, labels


def test_linear_probe_uses_feature_norms() -> None:
    x, y = _norm_coded_features(40)
    # Unit-norm features carry no label information: the probe could do no better than half.
    assert torch.allclose(x / x.norm(dim=1, keepdim=True), x[:1] / x[:1].norm())
    result = linear_probe(x, y, x, y, num_classes=2, epochs=150, lr=0.05, batch_size=40, seed=0)
    assert result.accuracy == 1.0


def test_extract_features_returns_raw_encoder_output() -> None:
    model = _tiny_model().eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    h, z = extract_features(model, images, batch_size=2)
    with torch.no_grad():
        want_h = model.encoder(images.float() / 255)
        _, want_z = model(images.float() / 255)
    assert (want_h.norm(dim=1) - 1).abs().min() > 0.1
    torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z, want_z, rtol=1e-4, atol=1e-5)
    assert to_float(images).max() <= 1.0


class _Captured(Exception):
    pass


def test_evaluation_hands_raw_features_to_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_model()
    g = torch.Generator().manual_seed(3)
    train = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    seen: dict[str, torch.Tensor] = {}

    def fake_probe(
        train_x: torch.Tensor, _y: torch.Tensor, test_x: torch.Tensor, *a: Any, **k: Any
    ) -> Any:
        seen["train"], seen["test"] = train_x, test_x
        raise _Captured

    monkeypatch.setattr(evaluate_module, "linear_probe", fake_probe)
    with pytest.raises(_Captured):
        evaluate_module.evaluate_model(
            model,
            train_images=train,
            train_labels=torch.tensor([0, 1, 0, 1, 0, 1]),
            train_clients=torch.tensor([0, 0, 0, 1, 1, 1]),
            test_images=test,
            test_labels=torch.tensor([0, 1, 0, 1]),
            num_classes=2,
            settings=EvaluationConfig(linear_epochs=1, knn_k=3),
            augment=SSL_AUGMENT,
            seed=0,
            device=torch.device("cpu"),
            log=lambda _line: None,
        )
    model.eval()
    with torch.no_grad():
        want_train = model.encoder(train.float() / 255)
        want_test = model.encoder(test.float() / 255)
    assert not math.isclose(float(want_train.norm(dim=1).mean()), 1.0, rel_tol=0.1)
    torch.testing.assert_close(seen["train"].cpu(), want_train, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["test"].cpu(), want_test, rtol=1e-4, atol=1e-5)
