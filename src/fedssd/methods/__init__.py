"""The method registry: one literal dict from name to method class (docs/methods.md, "Adding a
method")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedssd.config import from_dict
from fedssd.errors import ConfigError
from fedssd.methods import (
    fedalignuniform,
    fedbyol,
    feddecorr,
    fedema,
    fedsimclr,
    fedsimsiam,
    fedu,
    fedu2,
    fedx,
    hsd,
    ldawa,
    orchestra,
    ssd,
    views,
)
from fedssd.methods.protocol import ClientUpdate, Method, MethodContext, MethodSpec

METHODS: dict[str, MethodSpec] = {
    "fedalignuniform": MethodSpec(
        method=fedalignuniform.FedAlignUniform,
        options=views.AlignUniformOptions,
        summary="alignment + uniformity locally, FedAvg (Wang & Isola 2020; SSD's base)",
    ),
    "ssd": MethodSpec(
        method=ssd.SSD,
        options=ssd.SSDOptions,
        summary="soft separation (DSR) + projector distillation on FedAlignUniform (ICCV 2025)",
    ),
    "fedx": MethodSpec(
        method=fedx.FedX,
        options=fedx.FedXOptions,
        summary="FedAlignUniform + FedX relational/cross distillation from the global model "
        "(ECCV 2022)",
    ),
    "ldawa": MethodSpec(
        method=ldawa.LDAWA,
        options=ldawa.LDAWAOptions,
        summary="FedAlignUniform + layer-wise cosine-scaled aggregation, L-DAWA (ICCV 2023)",
    ),
    "feddecorr": MethodSpec(
        method=feddecorr.FedDecorr,
        options=feddecorr.FedDecorrOptions,
        summary="FedAlignUniform + decorrelation regulariser on h, FedDecorr (ICLR 2023)",
    ),
    "fedu2": MethodSpec(
        method=fedu2.FedU2,
        options=fedu2.FedU2Options,
        summary="FedAlignUniform + FUR (sliced Wasserstein to uniform) + EUA aggregation, "
        "FedU2 (CVPR 2024)",
    ),
    "hsd": MethodSpec(
        method=hsd.HSD,
        options=hsd.HSDOptions,
        summary="FedAlignUniform with each client hard-confined to its own subspace (SSD's "
        "ablation)",
    ),
    "fedsimclr": MethodSpec(
        method=fedsimclr.FedSimCLR,
        options=fedsimclr.SimCLROptions,
        summary="SimCLR's NT-Xent locally, FedAvg (Chen et al. 2020)",
    ),
    "fedsimsiam": MethodSpec(
        method=fedsimsiam.FedSimSiam,
        options=fedsimsiam.SimSiamOptions,
        summary="SimSiam locally, FedAvg incl. the predictor (Chen & He 2021)",
    ),
    "fedbyol": MethodSpec(
        method=fedbyol.FedBYOL,
        options=fedbyol.BYOLOptions,
        summary="BYOL locally with a per-client EMA target, FedAvg (Grill et al. 2020)",
    ),
    "fedu": MethodSpec(
        method=fedu.FedU,
        options=fedu.FedUOptions,
        summary="BYOL + divergence-aware predictor update (Zhuang et al., ICCV 2021)",
    ),
    "fedema": MethodSpec(
        method=fedema.FedEMA,
        options=fedema.FedEMAOptions,
        summary="BYOL + divergence-aware EMA of the local model (Zhuang et al., ICLR 2022)",
    ),
    "orchestra": MethodSpec(
        method=orchestra.Orchestra,
        options=orchestra.OrchestraOptions,
        summary="local + global Sinkhorn clustering, EMA-target cluster assignment (ICML 2022)",
    ),
}

__all__ = ["METHODS", "ClientUpdate", "Method", "MethodContext", "build_method", "resolve_options"]


def resolve_options(name: str, options: Mapping[str, Any]) -> Any:
    """The method's option dataclass built from ``options`` (defaults filled in).

    Raises:
        ConfigError: The method is unknown, or an option is unknown or of the wrong type.
    """
    spec = _spec(name)
    return from_dict(spec.options, options, where="method")


def option_dict(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with every default filled in, as plain data."""
    return dataclasses.asdict(resolve_options(name, options))


def shared_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that method ``name`` also has (to run another method on the
    same experiment, e.g. SSD's ``uniformity_weight`` carries over to FedAlignUniform)."""
    known = {field.name for field in dataclasses.fields(_spec(name).options)}
    return {key: value for key, value in options.items() if key in known}


def build_method(name: str, options: Mapping[str, Any], context: MethodContext) -> Method:
    """Build the named method from its options."""
    return _spec(name).build(resolve_options(name, options), context)


def _spec(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
