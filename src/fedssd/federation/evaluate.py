"""The evaluations a run makes: the kNN monitor during training and the final summary.

:func:`evaluate_model` evaluates a global model on data held in one place (the pooled training
set of a simulated split, or a labelled set the server owns). :func:`client_evaluation` and
:func:`combine_client_evaluations` are the federated evaluation: each client computes, on its own
images only, the metrics that need no other party's data, and the server combines them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fedssd.config import EvaluationConfig
from fedssd.data.augment import AugmentConfig, two_views
from fedssd.evaluation.features import extract_features
from fedssd.evaluation.knn import knn_accuracy
from fedssd.evaluation.linear_probe import linear_probe
from fedssd.evaluation.metrics import (
    alignment_loss,
    effective_rank,
    representation_metrics,
    uniformity_loss,
)
from fedssd.seeding import EVALUATION, derive_seed


def label_warning(train_labels: torch.Tensor, test_labels: torch.Tensor) -> str | None:
    """A warning when the labels cannot measure anything: with a single class in the labelled
    pool or the test set, kNN and linear-probe accuracy are 100% (or 0%) whatever the model.

    Returns:
        One line, or None when both hold at least two classes.
    """
    parts = [
        f"the {name} labels hold one class ({int(labels[0])})"
        for name, labels in (("training", train_labels), ("test", test_labels))
        if labels.numel() and bool((labels == labels[0]).all())
    ]
    if not parts:
        return None
    return (
        f"warning: {' and '.join(parts)}, so kNN and linear-probe accuracy measure nothing here; "
        "the label-free metrics (uniformity, alignment, effective rank) still do."
    )


def knn_monitor(
    *,
    every: int,
    last_round: int,
    bank_images: torch.Tensor,
    bank_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    batch_size: int,
    device: torch.device,
) -> Callable[[dict[str, Any], nn.Module], dict[str, Any] | None]:
    """A round callback adding ``knn_acc`` every ``every`` rounds and at the last round.

    The bank is every client's un-augmented training images, queried with the test set, on the
    normalised encoder output h (the SSD paper's kNN monitor, docs/evaluation.md).
    """

    def monitor(record: dict[str, Any], model: nn.Module) -> dict[str, Any] | None:
        done = int(record["round"])
        if done % every and done != last_round:
            return None
        bank, _ = extract_features(model, bank_images, batch_size=batch_size, device=device)
        queries, _ = extract_features(model, test_images, batch_size=batch_size, device=device)
        accuracy = knn_accuracy(
            bank.to(device),
            bank_labels,
            queries,
            test_labels,
            num_classes=num_classes,
            k=k,
            temperature=temperature,
        )
        return {"knn_acc": accuracy}

    return monitor


@torch.no_grad()
def view_alignment(
    model: nn.Module,
    images: torch.Tensor,
    *,
    augment: AugmentConfig,
    generator: torch.Generator,
    batch_size: int,
    device: torch.device,
) -> tuple[float, float]:
    """Alignment ``mean ||a - b||^2`` of unit-norm h and z over two augmented views of ``images``.

    The model is evaluated in eval mode on the views; its train/eval mode is restored.

    Returns:
        ``(alignment of h, alignment of z)``.
    """
    training = model.training
    model.eval()
    h_sum = z_sum = 0.0
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)
            view1, view2 = two_views(batch, augment, generator=generator)
            h1, z1 = model(view1)
            h2, z2 = model(view2)
            h_sum += alignment_loss(h1.float(), h2.float()) * batch.shape[0]
            z_sum += alignment_loss(z1.float(), z2.float()) * batch.shape[0]
    finally:
        model.train(training)
    return h_sum / images.shape[0], z_sum / images.shape[0]


def evaluate_model(
    model: nn.Module,
    *,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    train_clients: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    settings: EvaluationConfig,
    augment: AugmentConfig,
    seed: int,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The final evaluation of a global model (the SSD paper's protocols, docs/evaluation.md).

    Metrics without a suffix are of the encoder output h (the representation used downstream);
    ``*_z`` are of the projector output z, so the effect of projector distillation is visible.
    Uniformity is reported as ``-L_unif`` (higher is better); alignment as ``L_align`` of two
    augmented views (lower is better).

    Args:
        model: ``model(x) -> (h, z_raw)``.
        train_images: ``(n, c, height, width)`` uint8, every client's training images.
        train_labels: ``(n,)`` their labels.
        train_clients: ``(n,)`` the client holding each image.
        test_images: ``(m, c, height, width)`` uint8 test images.
        test_labels: ``(m,)`` their labels.
        num_classes: Number of classes.
        settings: Evaluation options.
        augment: The augmentation whose views alignment is measured on.
        seed: Seed of the sampled metrics, the probe's shuffling and the views.
        device: Where to compute.
        log: Progress lines.

    Returns:
        ``linear_probe_acc`` (None when ``settings.linear_epochs`` is 0), ``knn_acc``,
        uniformity (global, intra, inter), ``alignment``,
        ``effective_rank`` and their ``_z`` counterparts, as plain JSON data.
    """
    batch = settings.batch_size
    h_train, z_train = extract_features(model, train_images, batch_size=batch, device=device)
    h_test, _ = extract_features(model, test_images, batch_size=batch, device=device)
    knn = knn_accuracy(
        h_train.to(device),
        train_labels,
        h_test,
        test_labels,
        num_classes=num_classes,
        k=settings.knn_k,
        temperature=settings.knn_temperature,
    )
    probe_acc: float | None = None
    probe_train_acc: float | None = None
    if settings.linear_epochs:
        log(f"kNN accuracy {100 * knn:.2f}%; linear probe ({settings.linear_epochs} epochs)")
        probe = linear_probe(
            h_train,
            train_labels,
            h_test,
            test_labels,
            num_classes=num_classes,
            epochs=settings.linear_epochs,
            lr=settings.linear_lr,
            batch_size=settings.linear_batch_size,
            seed=seed,
            device=device,
            log=log,
        )
        probe_acc, probe_train_acc = probe.accuracy, probe.train_accuracy
    else:
        log(f"kNN accuracy {100 * knn:.2f}%; no linear probe (evaluation.linear_epochs = 0)")
    quality_h, quality_z = (
        representation_metrics(
            features,
            train_clients,
            max_samples=settings.metrics_samples,
            max_per_client=settings.metrics_per_client,
            seed=seed,
        )
        for features in (h_train, z_train)
    )
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    sample = torch.randperm(train_images.shape[0], generator=torch.Generator().manual_seed(seed))[
        : settings.metrics_samples
    ]
    align_h, align_z = view_alignment(
        model,
        train_images[sample],
        augment=augment,
        generator=generator,
        batch_size=batch,
        device=device,
    )
    summary: dict[str, Any] = {
        "linear_probe_acc": probe_acc,
        "linear_probe_train_acc": probe_train_acc,
        "knn_acc": knn,
        "alignment": align_h,
        "alignment_z": align_z,
    }
    keys = (
        "uniformity_global",
        "uniformity_intra_mean",
        "uniformity_inter_mean",
        "effective_rank",
        "uniformity_intra",
        "uniformity_inter",
    )
    for key in keys:
        summary[key] = quality_h[key]
    for key in keys:
        summary[f"{key}_z"] = quality_z[key]
    summary["metrics_samples"] = quality_h["samples_global"]
    return summary


# --------------------------------------------------------------------- federated evaluation

#: Share of a client's labelled images held out as kNN queries (the rest is the bank).
KNN_HELD_OUT = 0.2
#: The per-client metrics weighted by the client's number of images when combined.
CLIENT_METRICS = (
    "uniformity",
    "uniformity_z",
    "alignment",
    "alignment_z",
    "effective_rank",
    "effective_rank_z",
)


def client_evaluation_seed(run_seed: int, client_id: int) -> int:
    """The seed of client ``client_id``'s :func:`client_evaluation` in a run seeded ``run_seed``
    (the simulator and a Flower node use the same one, so they record the same numbers)."""
    return derive_seed(run_seed, EVALUATION, client_id)


@torch.no_grad()
def client_evaluation(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    settings: EvaluationConfig,
    augment: AugmentConfig,
    seed: int,
    device: torch.device,
) -> dict[str, float]:
    """The metrics a client computes on its own images, needing nobody else's data.

    The images are sampled as :func:`evaluate_model` samples the whole training set: a seeded
    permutation's first ``settings.metrics_samples`` images give ``uniformity`` (``-L_unif`` of
    unit-norm features, higher is better), ``effective_rank`` (of the raw features) and
    ``alignment`` (``L_align`` of two augmented views, lower is better), each of the encoder
    output h and, with the suffix ``_z``, of the projector output z. With labels, a seeded
    random :data:`KNN_HELD_OUT` of the labelled images are kNN queries against a bank of the
    rest (``knn_acc``, ``knn_queries``).

    Args:
        model: ``model(x) -> (h, z_raw)``, on ``device``.
        images: ``(n, c, height, width)`` uint8, this client's images.
        labels: ``(n,)`` int64 labels (-1 for an unlabelled image), or None.
        settings: Evaluation options (sample size, kNN k and temperature, batch size).
        augment: The augmentation whose views alignment is measured on.
        seed: Seed of the sample, the views and the kNN split (runs use
            :func:`client_evaluation_seed`).
        device: Where to compute.

    Returns:
        ``num_samples`` and the metrics above as floats (uniformity needs two images, kNN two
        labelled ones; a metric that cannot be computed is left out).
    """
    count = int(images.shape[0])
    result: dict[str, float] = {"num_samples": float(count)}
    if count == 0:
        return result
    batch = settings.batch_size
    h, z = extract_features(model, images, batch_size=batch, device=device)
    sample = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[
        : settings.metrics_samples
    ]
    for suffix, features in (("", h), ("_z", z)):
        if sample.shape[0] >= 2:
            result[f"uniformity{suffix}"] = -uniformity_loss(features[sample])
        result[f"effective_rank{suffix}"] = effective_rank(features[sample])
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    align_h, align_z = view_alignment(
        model, images[sample], augment=augment, generator=generator, batch_size=batch, device=device
    )
    result["alignment"], result["alignment_z"] = align_h, align_z
    if labels is not None:
        labelled = torch.nonzero(labels.cpu() >= 0).squeeze(1)
        if labelled.shape[0] >= 2:
            order = labelled[
                torch.randperm(labelled.shape[0], generator=torch.Generator().manual_seed(seed + 1))
            ]
            held = min(max(1, round(KNN_HELD_OUT * order.shape[0])), order.shape[0] - 1)
            queries, bank = order[:held], order[held:]
            own = labels.cpu()
            result["knn_acc"] = knn_accuracy(
                h[bank].to(device),
                own[bank],
                h[queries],
                own[queries],
                num_classes=int(own[labelled].max()) + 1,
                k=settings.knn_k,
                temperature=settings.knn_temperature,
            )
            result["knn_queries"] = float(held)
    return result


def _weighted_mean(pairs: list[tuple[float, float]]) -> float | None:
    total = sum(weight for _, weight in pairs)
    return sum(value * weight for value, weight in pairs) / total if total > 0 else None


def combine_client_evaluations(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    """The run's federated evaluation from the clients' :func:`client_evaluation` results.

    Each of :data:`CLIENT_METRICS` is the mean over the clients that report it, weighted by
    their ``num_samples``; ``knn_acc`` is weighted by ``knn_queries`` (the labelled held-out
    images), so it is the accuracy over all clients' queries together.

    Args:
        per_client: Client id -> that client's metrics.

    Returns:
        ``evaluation = "federated"``, ``clients_evaluated``, ``num_samples``, the weighted means
        under the metrics' own names (``knn_acc`` and ``knn_queries`` when any client had
        labels; a metric no client reports is None), and ``federated = {"per_client": {id:
        metrics}}`` with the ids as strings (JSON keys), in id order.
    """
    clients = sorted(per_client)
    summary: dict[str, Any] = {
        "evaluation": "federated",
        "clients_evaluated": len(clients),
        "num_samples": int(sum(per_client[k].get("num_samples", 0.0) for k in clients)),
    }
    for key in CLIENT_METRICS:
        summary[key] = _weighted_mean(
            [
                (float(per_client[k][key]), float(per_client[k]["num_samples"]))
                for k in clients
                if key in per_client[k]
            ]
        )
    knn = [
        (float(per_client[k]["knn_acc"]), float(per_client[k]["knn_queries"]))
        for k in clients
        if "knn_acc" in per_client[k]
    ]
    if knn:
        summary["knn_acc"] = _weighted_mean(knn)
        summary["knn_queries"] = int(sum(weight for _, weight in knn))
    summary["federated"] = {
        "per_client": {
            str(k): {
                key: (int(v) if key in ("num_samples", "knn_queries") else float(v))
                for key, v in per_client[k].items()
            }
            for k in clients
        }
    }
    return summary
