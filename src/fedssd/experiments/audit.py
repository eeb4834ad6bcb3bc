"""The one-run privacy audit of a DP configuration: ``fedssd privacy-audit``.

Trains the configured federation once more, in memory, with the auditor's canary clients beside
the real ones (:mod:`fedssd.federation.audit`), and returns the empirical lower bound on epsilon
next to the accountant's epsilon for the same run. Nothing is written.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fedssd.config import Config
from fedssd.errors import ConfigError
from fedssd.experiment import Experiment, build_experiment, check_setup, warm_start
from fedssd.federation.accounting import round_charge
from fedssd.federation.audit import (
    CanaryAggregator,
    audit_bound,
    audited_layout,
    canary_scores,
    draw_canaries,
)
from fedssd.federation.privacy import SecretRandomness
from fedssd.federation.server import local_keys
from fedssd.federation.simulator import run_rounds
from fedssd.runs.resolve import load_config
from fedssd.runtime import cpu_threads

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """What the audit found.

    Attributes:
        epsilon_lower_bound: The empirical lower bound on epsilon (0: nothing shown).
        accountant_epsilon: The accountant's epsilon for the same run (inf without noise).
        delta: The delta both hold at.
        confidence: The bound's confidence ``1 - beta``.
        canaries: m.
        included: The canaries whose coin said "in".
        guesses: The guesses behind the bound (the abstentions left out).
        correct: The right ones among them.
        rounds: The rounds run.
        noise_multiplier: z.
        clip_norm: C (the first round's, with adaptive clipping).
        dimension: d, the length of the audited update vector.
        audit_seed: The seed of the canaries' coins and directions.
    """

    epsilon_lower_bound: float
    accountant_epsilon: float
    delta: float
    confidence: float
    canaries: int
    included: int
    guesses: int
    correct: int
    rounds: int
    noise_multiplier: float
    clip_norm: float
    dimension: int
    audit_seed: int


def audit_config(source: str | Path) -> str | Path:
    """The config to audit: a run folder's ``config.toml``, else ``source`` itself (a TOML file
    or a preset's name)."""
    path = Path(source)
    return path / "config.toml" if path.is_dir() else source


def check_auditable(config: Config) -> None:
    """Refuse a config whose mechanism the audit cannot attack soundly.

    Raises:
        ConfigError: DP is off, or the cohort has a fixed size below K (accounted for
            replacing one client, not for adding or removing one).
    """
    fed = config.federation
    if config.privacy.dp == "off":
        raise ConfigError(
            "the privacy audit attacks the DP mechanism, but privacy.dp is 'off'; set "
            "privacy.dp = 'fixed' or 'adaptive' (--set privacy.dp=fixed)."
        )
    charge = round_charge(
        num_clients=fed.num_clients,
        fraction=fed.fraction,
        sampling=fed.sampling,
        noise_multiplier=0.0,
    )
    if charge.sampling == "fixed":
        raise ConfigError(
            f"the privacy audit adds or removes a canary client, which a cohort of fixed size "
            f"(federation.fraction = {fed.fraction:g}, sampling 'fixed') is not accounted for; "
            "audit it with federation.sampling = 'poisson' or federation.fraction = 1."
        )


def privacy_audit(
    config: Config | str | Path,
    *,
    overrides: Sequence[str] = (),
    canaries: int = 1000,
    audit_seed: int | None = None,
    confidence: float = 0.95,
    log: Log | None = None,
) -> AuditReport:
    """Run the configured DP federation once with canary clients and bound epsilon from below.

    Args:
        config: A :class:`~fedssd.config.Config`, a TOML file, a preset's name or a run folder
            (its ``config.toml``).
        overrides: ``dotted.key=value`` strings applied on top.
        canaries: m, the canary clients (each in the run with probability 1/2).
        audit_seed: The seed of the canaries' coins and directions (None: a fresh one from the
            operating system, reported); never the run seed.
        confidence: The bound's confidence ``1 - beta``.
        log: Progress lines (None: silence).

    Raises:
        fedssd.errors.FedSSDError: The config is invalid or not auditable, in one sentence.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"the confidence must be in (0, 1), not {confidence:g}.")
    if canaries < 2:
        raise ConfigError(f"the audit needs at least 2 canaries, not {canaries}.")
    say: Log = log or (lambda _message: None)
    source = config if isinstance(config, Config) else audit_config(config)
    cfg = load_config(source, overrides=overrides)
    check_auditable(cfg)
    check_setup(cfg)
    seed = secrets.randbits(63) if audit_seed is None else audit_seed
    experiment = build_experiment(cfg, log=say)
    warm_start(experiment, log=say)
    with cpu_threads(cfg.threads):
        return _audit(experiment, canaries=canaries, seed=seed, confidence=confidence, say=say)


def _audit(
    experiment: Experiment, *, canaries: int, seed: int, confidence: float, say: Log
) -> AuditReport:
    """The audit run of a built experiment (see :func:`privacy_audit`)."""
    cfg, model = experiment.config, experiment.global_model
    fed = cfg.federation
    excluded = local_keys(model, experiment.method)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layout = audited_layout(initial, excluded)
    drawn = draw_canaries(canaries, layout.dimension, seed=seed)
    aggregator = CanaryAggregator(
        cfg.privacy,
        num_clients=fed.num_clients,
        fraction=fed.fraction,
        sampling=fed.sampling,
        rounds=fed.rounds,
        randomness=SecretRandomness(cfg.seed if cfg.privacy.reproducible_noise else None),
        canaries=drawn,
        layout=layout,
        audit_seed=seed,
    )
    released = [initial]

    def observe(record: dict[str, Any], global_model: nn.Module) -> None:
        released.append({k: v.detach().clone() for k, v in global_model.state_dict().items()})
        say(f"audit round {record['round']}/{fed.rounds}: epsilon {record['dp_epsilon']:.3g}")

    say(
        f"auditing with {canaries} canary clients ({int(drawn.included.sum())} in) beside "
        f"{fed.num_clients} clients, {fed.rounds} rounds, noise multiplier "
        f"{aggregator.charge.noise_multiplier:.4g}, audit seed {seed}"
    )
    history = run_rounds(
        global_model=model,
        client_model=experiment.client_model,
        method=experiment.method,
        images=experiment.images,
        client_indices=experiment.client_indices,
        schedule=experiment.schedule,
        settings=experiment.settings,
        guards=dataclasses.replace(experiment.guards, privacy=aggregator),
        callbacks=[observe],
    )
    scores = canary_scores(drawn, layout, released)
    bound = audit_bound(scores, drawn.included, delta=cfg.privacy.delta, confidence=confidence)
    return AuditReport(
        epsilon_lower_bound=bound.epsilon,
        accountant_epsilon=float(history[-1]["dp_epsilon"]),
        delta=cfg.privacy.delta,
        confidence=confidence,
        canaries=canaries,
        included=int(drawn.included.sum()),
        guesses=bound.guesses,
        correct=bound.correct,
        rounds=len(history),
        noise_multiplier=aggregator.charge.noise_multiplier,
        clip_norm=cfg.privacy.clip_norm,
        dimension=layout.dimension,
        audit_seed=seed,
    )
