"""The server's norm check never drops an honest update, and every rejection is said.

The check measures the learned weights only (BatchNorm's running statistics follow a site's
images, not its learning) and needs ``validation.min_peers`` (3) other updates; a rejection is
recorded apart from failures, printed with the client and reason, and counted in the summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fedssd
from fedssd.config import ValidationConfig
from fedssd.data.augment import SSL_AUGMENT
from fedssd.federation.callbacks import progress, round_callbacks
from fedssd.federation.client import LocalSettings
from fedssd.federation.simulator import Guards, Schedule, run_rounds
from fedssd.federation.validate import learned_keys, norm_outliers, update_distance
from fedssd.methods import ClientUpdate, MethodContext, build_method
from fedssd.methods.protocol import ClientState
from fedssd.methods.server import aggregate_updates
from fedssd.models import build_model
from fedssd.runs.resolve import load_config
from helpers import method_context

ROOT = Path(__file__).resolve().parents[2]
SMOKE = str(ROOT / "src" / "fedssd" / "configs" / "smoke.toml")


def _model() -> nn.Module:
    torch.manual_seed(1)
    return build_model(encoder="small_cnn", width=2, projector_hidden=8, projector_out=None)


def _sites(spreads: Sequence[tuple[int, int] | None], size: int) -> torch.Tensor:
    """``size`` 8x8 RGB images per site: pixels uniform in ``[low, high)``, or black and white
    (None)."""
    generator = torch.Generator().manual_seed(0)
    chunks = []
    for spread in spreads:
        if spread is None:
            chunk = torch.randint(0, 2, (size, 3, 8, 8), generator=generator) * 255
        else:
            chunk = torch.randint(spread[0], spread[1], (size, 3, 8, 8), generator=generator)
        chunks.append(chunk.to(torch.uint8))
    return torch.cat(chunks)


def _context(num_clients: int) -> MethodContext:
    return method_context(num_clients, feature_dim=8, embed_dim=8, seed=3)


class Recorder:
    """Delegates to a method and keeps each round's aggregated updates. Client ``shifted``'s
    BatchNorm statistics end far from the others' (what a site whose images are darker or of
    another contrast does to them) while its learned weights train as everyone's; client
    ``scaled`` sends its weights times 1,000 (an attack)."""

    local_modules: frozenset[str] = frozenset()

    def __init__(self, inner: Any, *, shifted: int = -1, scaled: int = -1) -> None:
        self.inner = inner
        self.shifted = shifted
        self.scaled = scaled
        self.rounds: list[list[ClientUpdate]] = []

    def local_loss(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.inner.local_loss(*args, **kwargs)  # type: ignore[no-any-return]

    def begin_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass

    def end_client(
        self, model: nn.Module, stored: ClientState | None, *, client_id: int, round_index: int
    ) -> tuple[ClientState, dict[str, torch.Tensor]]:
        with torch.no_grad():
            if client_id == self.shifted:
                for module in model.modules():
                    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                        assert module.running_var is not None and module.running_mean is not None
                        module.running_var.mul_(100.0)
                        module.running_mean.add_(5.0)
            if client_id == self.scaled:
                for parameter in model.parameters():
                    parameter.mul_(1000.0)
        return ClientState(), {}

    def aggregate(
        self, global_state: Any, updates: Sequence[ClientUpdate], *, round_index: int
    ) -> dict[str, torch.Tensor]:
        self.rounds.append(list(updates))
        return aggregate_updates(self.inner, global_state, updates, round_index=round_index)


def _run(
    method: Any,
    images: torch.Tensor,
    indices: list[torch.Tensor],
    *,
    rounds: int,
    guards: Guards | None = None,
) -> list[dict[str, Any]]:
    return run_rounds(
        global_model=_model(),
        client_model=_model(),
        method=method,
        images=images,
        client_indices=indices,
        schedule=Schedule(
            num_clients=len(indices),
            fraction=1.0,
            rounds=rounds,
            lr=0.05,
            lr_schedule="constant",
            seed=5,
        ),
        settings=LocalSettings(
            epochs=1, batch_size=8, lr=0.05, momentum=0.9, weight_decay=0.0, augment=SSL_AUGMENT
        ),
        guards=guards,
    )


def test_the_check_measures_learned_weights_not_batchnorm_statistics() -> None:
    model = _model()
    keys = learned_keys(model)
    buffers = {name for name, _ in model.named_buffers()}
    assert any(name.endswith("running_var") for name in buffers)
    assert keys == {name for name, _ in model.named_parameters()}
    assert keys == set(model.state_dict()) - buffers
    state = {k: v.clone() for k, v in model.state_dict().items()}
    moved = {k: v.clone() for k, v in state.items()}
    for name in buffers:
        if moved[name].is_floating_point():
            moved[name] += 1000.0
    assert update_distance(state, moved, keys=keys) == 0.0
    weight = next(name for name in keys if name.endswith("weight"))
    moved[weight] = moved[weight] + 1.0
    assert update_distance(state, moved, keys=keys) == pytest.approx(moved[weight].numel() ** 0.5)


def test_too_few_other_updates_never_judge() -> None:
    # Three replies: the median of the two others is their mean; no verdict at min_peers = 3.
    assert norm_outliers([0.2, 0.25, 5.0], ratio=10, min_peers=ValidationConfig().min_peers) == []
    assert norm_outliers([0.2, 0.25, 0.3, 5.0], ratio=10, min_peers=3) == [3]


def test_a_site_whose_statistics_differ_is_kept_and_an_attacker_still_rejected() -> None:
    """Six sites, the check active: client 3's BatchNorm statistics end far from everyone's (in
    the old measure, over every float entry, it moved far more than 10 times the median); its
    learned weights did not, and its update is aggregated. Client 1 sends its model scaled by
    1,000: it alone is rejected, named in the record with the reason."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8)
    indices = [torch.arange(16 * k, 16 * (k + 1)) for k in range(6)]
    start = _model().state_dict()
    recorder = Recorder(build_method("fedalignuniform", {}, _context(6)), shifted=3, scaled=1)
    record = _run(recorder, images, indices, rounds=1)[0]
    assert list(record["rejected"]) == ["1"] and "times the median" in record["rejected"]["1"]
    assert record["failed"] == {} and record["accepted"] == 5
    updates = recorder.rounds[0]
    assert [u.client_id for u in updates] == [0, 2, 3, 4, 5]
    every_float = set(start)
    per_step = [update_distance(start, u.state, keys=every_float) / u.weight for u in updates]
    others = sorted(per_step[:2] + per_step[3:])
    assert per_step[2] > 10 * others[2]  # what the old measure rejected


@pytest.mark.slow
@pytest.mark.parametrize(
    "validation",
    [ValidationConfig(), ValidationConfig(min_peers=2)],
    ids=["defaults", "median-of-2"],
)
def test_three_honest_sites_are_never_rejected(validation: ValidationConfig) -> None:
    """Three sites as a hospital group has them: a low-contrast one, one of ordinary images and
    one of black-and-white scans. The low-contrast site moves most; the old check (every float
    entry, median of the two others) rejected its round-6 update while nothing failed. With the
    defaults (3 others needed) and even with the median of two, every update is aggregated."""
    images = _sites([(126, 130), (0, 256), None], size=32)
    indices = [torch.arange(32 * k, 32 * (k + 1)) for k in range(3)]
    method = build_method("fedalignuniform", {}, _context(3))
    history = _run(method, images, indices, rounds=6, guards=Guards(validation=validation))
    assert [r["accepted"] for r in history] == [3] * 6
    assert all(r["rejected"] == {} and r["failed"] == {} for r in history)


def test_a_run_too_small_for_the_check_says_so() -> None:
    said: list[str] = []
    for clients in (3, 4):
        cfg = load_config(SMOKE, overrides=[f"federation.num_clients={clients}"])
        round_callbacks(cfg, None, torch.device("cpu"), None, said.append)
    assert [line for line in said if "norm check" in line] == [
        "the update norm check is off: it judges an update against at least 3 others "
        "(validation.min_peers) and a round samples 3 clients"
    ]


def test_the_stream_names_every_rejected_and_failed_client() -> None:
    lines: list[str] = []
    report = progress("ssd", 5, lines.append)
    record = {
        "round": 3,
        "loss": 1.0,
        "seconds": 0.5,
        "accepted": 2,
        "failed": {"0": "crashed"},
        "rejected": {"2": "update moved 53.9 per local step, more than 10 times ..."},
    }
    report(record, _model())
    assert lines[1] == (
        "[ssd] round 3/5: rejected the update of client 2: update moved 53.9 per local step, "
        "more than 10 times ..."
    )
    assert lines[2] == "[ssd] round 3/5: client 0 failed: crashed"
    report({**record, "round": 4, "failed": {}, "rejected": {}}, _model())
    assert len(lines) == 4  # a round without either prints its one line
    # A DP run's cohort stays on the server: the stream counts, the server-only log names.
    private: list[str] = []
    progress("ssd", 5, private.append, name_clients=False)(record, _model())
    assert private[1] == (
        "[ssd] round 3/5: 1 update(s) rejected, 1 client(s) failed (named in "
        "server_only/rounds.jsonl)"
    )


@pytest.mark.slow
def test_a_run_counts_rejections_apart_from_failures(tmp_path: Path) -> None:
    """A run whose check is set far too tight (1.01 times the median) rejects honest updates:
    each is printed with its client and reason, recorded per round under ``rejected`` and
    counted in ``rejected_clients`` and the per-site table, never as a failure."""
    lines: list[str] = []
    run = tmp_path / "run"
    fedssd.train(
        SMOKE,
        overrides=[
            "data.train_subset=400",
            "data.test_subset=100",
            "model.width=4",
            "model.projector_hidden=32",
            "federation.batch_size=32",
            "evaluation.every=0",
            "evaluation.linear_epochs=0",
            "evaluation.metrics_samples=100",
            "evaluation.metrics_per_client=20",
            "federation.num_clients=8",
            "validation.max_norm_ratio=1.01",
            "faults.crash=0.2",
        ],
        out=run,
        log=lines.append,
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    rejected = [(r["round"], c) for r in records for c in r["rejected"]]
    failed = [(r["round"], c) for r in records for c in r["failed"]]
    assert rejected and failed
    assert summary["rejected_clients"] == len(rejected)
    assert summary["failed_clients"] == len(failed)
    for round_number, client in rejected:
        said = f"[ssd] round {round_number}/2: rejected the update of client {client}:"
        assert any(line.startswith(said) and "times the median" in line for line in lines)
    sites = summary["sites"]
    assert [s["client"] for s in sites] == list(range(8))
    for site in sites:
        key = str(site["client"])
        assert site["rejected"] == sum(key in r["rejected"] for r in records)
        assert site["failed"] == sum(key in r["failed"] for r in records)
        assert site["aggregated"] == site["sampled"] - site["rejected"] - site["failed"]
