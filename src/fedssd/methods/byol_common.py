"""Pieces shared by the BYOL family (FedBYOL, FedU, FedEMA) and FedSimSiam (Grill et al.
2020; Zhuang et al. 2021, 2022), some also by Orchestra (EMA step, target copy, ``target.*``
prefixes).

- the predictor, attached to the model as ``extras.predictor`` (aggregated like the rest);
- the EMA target network kept per client (:class:`TargetNetwork`), one reusable module whose
  weights are swapped in and out of the client store;
- the BYOL loss of a model against that target;
- the divergence between two encoders (mean per-layer L2 distance of the conv weights) used by
  FedU's predictor rule and FedEMA's decay.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedssd import losses
from fedssd.methods.protocol import ClientState
from fedssd.methods.views import full_precision

PREDICTOR = "predictor"
"""Name of the predictor among the model's extra modules (state keys ``extras.predictor.*``)."""

TARGET_PREFIX = "target."
"""Prefix of the target network's tensors in a :class:`ClientState`."""


def predictor_of(model: nn.Module) -> nn.Module:
    """The model's predictor (``model.extras["predictor"]``)."""
    extras = model.extras
    if not isinstance(extras, nn.ModuleDict) or PREDICTOR not in extras:
        raise TypeError("the model has no extras.predictor; attach the method's extra modules")
    return extras[PREDICTOR]


def ema(target: torch.Tensor, online: torch.Tensor, momentum: float) -> torch.Tensor:
    """One EMA step ``m * target + (1 - m) * online`` (a new tensor)."""
    return momentum * target + (1 - momentum) * online


@torch.no_grad()
def ema_update(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], m: float) -> None:
    """``target <- m * target + (1 - m) * online`` in place, tensor by tensor."""
    targets = list(target)
    torch._foreach_mul_(targets, m)
    torch._foreach_add_(targets, list(online), alpha=1 - m)


def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """Move ``target``'s parameters toward ``online``'s in place: ``t <- m t + (1 - m) o``.

    Parameters only (as in BYOL, Grill et al., NeurIPS 2020): the target's BatchNorm statistics are
    its own, updated by its forward passes. Both modules must have the same structure.
    """
    ema_update(*_parameter_lists(target, online), momentum)


def _parameter_lists(
    target: nn.Module, online: nn.Module
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters of ``target`` and of ``online``, checked to pair up one to one."""
    targets: list[torch.Tensor] = list(target.parameters())
    onlines: list[torch.Tensor] = list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError("target and online networks differ in structure")
    return targets, onlines


def online_network(model: nn.Module) -> nn.ModuleDict:
    """A view of the model's encoder and projector (state keys ``encoder.*``, ``projector.*``)."""
    return nn.ModuleDict(
        {"encoder": _module(model, "encoder"), "projector": _module(model, "projector")}
    )


def target_copy(model: nn.Module) -> nn.ModuleDict:
    """A frozen copy of the model's encoder and projector (made once, then reused)."""
    target = copy.deepcopy(online_network(model))
    target.requires_grad_(False)
    return target


def _module(model: nn.Module, name: str) -> nn.Module:
    """The sub-module ``name`` of ``model`` (typed)."""
    module = getattr(model, name)
    if not isinstance(module, nn.Module):
        raise TypeError(f"the model has no {name} module")
    return module


class TargetNetwork:
    """The client's EMA target (encoder + projector), one module reused for every client.

    Created on the first :meth:`load` as a deep copy of the client model's encoder and projector
    (gradients off), so no per-client, per-round copies are made: each client's weights are
    loaded into it in ``begin_client`` and read back in ``end_client``.

    Args:
        momentum: The EMA momentum m (0.99 for BYOL/FedU/FedEMA).
    """

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.module: nn.ModuleDict | None = None
        # The client model of the last EMA step and the paired parameter lists (target, online),
        # built at a client's first step and reused while the same model object steps.
        self._stepped: nn.Module | None = None
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def load(self, model: nn.Module, stored: ClientState | None) -> bool:
        """Set the target to the client's stored one, or to a copy of ``model``'s online network.

        Args:
            model: The client model (holding the received global weights).
            stored: The client's state, None before its first participation.

        Returns:
            Whether a stored target was found (False: first participation).
        """
        saved = {} if stored is None else strip_prefix(stored.tensors, TARGET_PREFIX)
        return self.load_state(model, saved)

    def load_state(self, model: nn.Module, saved: Mapping[str, torch.Tensor] | None) -> bool:
        """Set the target to ``saved`` (unprefixed keys), or, when there is none (None or
        empty), to a copy of ``model``'s online network; on ``model``'s device.

        Returns:
            Whether ``saved`` was loaded.
        """
        online = online_network(model)
        if self.module is None:
            self.module = target_copy(model)
        self.module.to(next(model.parameters()).device)
        self._stepped = None
        if saved:
            self.module.load_state_dict(saved)
            return True
        # A separate copy of the received online network (not the same object, as in BYOL).
        self.module.load_state_dict(online.state_dict())
        return False

    def step(self, model: nn.Module) -> None:
        """One EMA update toward ``model``'s encoder and projector."""
        module = self._require()
        if model is not self._stepped:
            self._pairs = _parameter_lists(module, online_network(model))
            self._stepped = model
        ema_update(*self._pairs, self.momentum)

    @torch.no_grad()
    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Target projection ``g_t(f_t(x))`` of ``(batch, c, h, w)`` images, ``(batch, dim)``.

        In training mode, like the online network: BatchNorm normalises with the batch statistics.
        """
        module = self._require()
        module.train()
        out: torch.Tensor = module["projector"](module["encoder"](x))
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The target's state (parameters and buffers) under ``target.*``, detached copies."""
        return with_prefix(self._require().state_dict(), TARGET_PREFIX)

    def _require(self) -> nn.ModuleDict:
        if self.module is None:
            raise RuntimeError("the target network is used before begin_client loaded it")
        return self.module


def byol_loss(
    model: nn.Module, target: TargetNetwork, view1: torch.Tensor, view2: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric BYOL loss ``[2 - 2 cos(p1, ut2)] + [2 - 2 cos(p2, ut1)]``, batch means.

    Each view goes through the online network separately (BatchNorm statistics per view, as in
    :func:`fedssd.methods.fedalignuniform.forward_views`); the predictor acts on the raw projector
    output. The loss is computed in float32 whatever the autocast precision.

    Args:
        model: The online model with ``extras.predictor``.
        target: The client's target network (loaded).
        view1: ``(batch, c, h, w)`` first view.
        view2: ``(batch, c, h, w)`` second view.
    """
    predictor = predictor_of(model)
    _, u1 = model(view1)
    _, u2 = model(view2)
    p1, p2 = predictor(u1).float(), predictor(u2).float()
    t1, t2 = target.project(view1).float(), target.project(view2).float()
    with full_precision(view1.device):
        loss = losses.byol_regression(p1, t2) + losses.byol_regression(p2, t1)
    return loss, {"byol": loss.detach()}


def divergence_keys(model: nn.Module) -> list[str]:
    """State keys (``encoder.*``) of the conv weights the divergence is measured on.

    Every ``Conv2d`` of the encoder with a kernel larger than 1x1: on the project's ResNet-18 this
    is the stem conv and the 16 block convs, the set EasyFL's ``conv`` name filter selects (the
    1x1 shortcut convs are left out); on the small CNN, its three convs. An encoder without
    convolutions falls back to all of its weight matrices.
    """
    encoder = _module(model, "encoder")
    keys = [
        f"encoder.{name}.weight"
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Conv2d) and module.weight.shape[2:].numel() > 1
    ]
    if keys:
        return keys
    return [f"encoder.{name}" for name, p in encoder.named_parameters() if p.ndim >= 2]


def divergence(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: list[str]
) -> float:
    """Mean per-layer L2 distance ``(1/|C|) sum_{l in C} ||a_l - b_l||_2`` (Zhuang et al.,
    ICCV 2021; the EasyFL code).

    A mean of per-tensor Frobenius norms, not one global norm.

    Args:
        a: A state dict (or part of one) holding ``keys``.
        b: Another, with the same shapes under ``keys``.
        keys: The tensors C to compare.
    """
    if not keys:
        raise ValueError("divergence needs at least one tensor")
    total = 0.0
    for key in keys:
        diff = a[key].detach().float().cpu() - b[key].detach().float().cpu()
        total += float(diff.norm())
    return total / len(keys)


def subset(
    state: Mapping[str, torch.Tensor], keys: list[str], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Detached copies of ``state[k]`` for ``k`` in ``keys``, stored under ``prefix + k``."""
    return {f"{prefix}{k}": state[k].detach().clone() for k in keys}


def strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Detached copies of all of ``tensors`` under ``prefix + name`` (see :func:`strip_prefix`)."""
    return {f"{prefix}{k}": v.detach().clone() for k, v in tensors.items()}
