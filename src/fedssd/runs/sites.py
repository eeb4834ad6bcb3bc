"""The per-site table of a run: each client's data, its part in the rounds and its own metrics.

Built from what a run folder holds (``partition.json``, the round records of ``metrics.jsonl``
and the final evaluation), so ``summary.json`` and ``fedssd report`` give the same table, also
for a run written before ``summary.json`` carried it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Per-client values of a central evaluation: summary key -> the table's column.
_CENTRAL = {"uniformity_intra": "uniformity", "uniformity_intra_z": "uniformity_z"}
#: Per-client values of a federated evaluation (each site's metrics on its own images).
_FEDERATED = (
    "knn_acc",
    "uniformity",
    "uniformity_z",
    "alignment",
    "alignment_z",
    "effective_rank",
    "effective_rank_z",
)


def site_table(
    partition: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    evaluation: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """One row per client, in id order.

    Args:
        partition: ``partition.json``'s content (``sizes``, ``labelled``).
        history: The round records (``clients``, ``failed``, ``rejected``, ``skipped``).
        evaluation: The final evaluation (``summary.json``): a central one gives each client's
            ``uniformity_intra``, a federated one each client's own metrics.

    Returns:
        Rows of ``client``, ``images``, ``labelled``, ``sampled`` (rounds it was sampled in),
        ``aggregated`` (rounds its update went into the global model), ``failed`` (rounds it
        sent no update), ``rejected`` (rounds the server refused its update), and the metrics
        the evaluation has for it: ``uniformity`` (``-L_unif`` of its own images' features,
        higher is more uniform) and ``uniformity_z``; from a federated evaluation also
        ``knn_acc`` on its own labelled images, ``alignment`` and ``effective_rank``.
    """
    sizes = list(partition.get("sizes", []))
    labelled = list(partition.get("labelled", []))
    rows: list[dict[str, Any]] = []
    for client, images in enumerate(sizes):
        key = str(client)
        sampled = [r for r in history if client in r.get("clients", ())]
        failed = sum(1 for r in sampled if key in r.get("failed", {}))
        rejected = sum(1 for r in sampled if key in r.get("rejected", {}))
        row: dict[str, Any] = {
            "client": client,
            "images": int(images),
            "labelled": int(labelled[client]) if client < len(labelled) else None,
            "sampled": len(sampled),
            "aggregated": sum(
                1
                for r in sampled
                if not r.get("skipped")
                and key not in r.get("failed", {})
                and key not in r.get("rejected", {})
            ),
            "failed": failed,
            "rejected": rejected,
        }
        for source, column in _CENTRAL.items():
            values = evaluation.get(source)
            # Row k of the central metrics is client k when every client has images.
            if isinstance(values, list) and len(values) == len(sizes):
                row[column] = values[client]
        own = evaluation.get("federated", {}).get("per_client", {}).get(key, {})
        for column in _FEDERATED:
            if column in own:
                row[column] = own[column]
        rows.append(row)
    return rows


#: The table's columns: the counts, then the metrics a row has (row key -> heading).
_COUNTS = {
    "client": "client",
    "images": "images",
    "labelled": "labelled",
    "sampled": "rounds sampled",
    "aggregated": "aggregated",
    "failed": "failed",
    "rejected": "rejected",
}
_METRICS = {
    "knn_acc": "kNN acc %",
    "uniformity": "-L_unif",
    "uniformity_z": "-L_unif (z)",
    "alignment": "L_align",
    "effective_rank": "eff. rank",
}


def format_site_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`site_table`'s rows as a Markdown table (kNN in %, other metrics to 3 decimals;
    ``-`` where a site has no value)."""
    metrics = [key for key in _METRICS if any(row.get(key) is not None for row in rows)]
    headings = {**_COUNTS, **{key: _METRICS[key] for key in metrics}}
    lines = [
        "| " + " | ".join(headings.values()) + " |",
        "| " + " | ".join("---" for _ in headings) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(key, row.get(key)) for key in headings) + " |")
    return "\n".join(lines)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "knn_acc":
        return f"{100 * float(value):.2f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
