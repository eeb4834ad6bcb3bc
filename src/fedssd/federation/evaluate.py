"""The evaluations a run makes: the kNN monitor during training and the final summary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedssd.config import EvaluationConfig
from fedssd.data.augment import AugmentConfig, two_views
from fedssd.evaluation.features import extract_features
from fedssd.evaluation.knn import knn_accuracy
from fedssd.evaluation.linear_probe import linear_probe
from fedssd.evaluation.metrics import alignment_loss, representation_metrics


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
    normalised encoder output h (SSD.md section 5).
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
    """The final evaluation of a global model (SSD.md section 5).

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
