"""The per-site table against hand counts: rounds sampled, aggregated, failed and rejected, and
each site's metrics from a central or a federated evaluation."""

from __future__ import annotations

from fedssd.runs.sites import format_site_table, site_table

PARTITION = {"sizes": [100, 40, 7], "labelled": [100, 0, 7]}
HISTORY = [
    {"round": 1, "clients": [0, 1, 2], "failed": {}, "rejected": {}, "skipped": False},
    {"round": 2, "clients": [0, 2], "failed": {"2": "crashed"}, "rejected": {}, "skipped": False},
    {
        "round": 3,
        "clients": [0, 1, 2],
        "failed": {"0": "no reply before the round timeout"},
        "rejected": {"1": "update moved ..."},
        "skipped": False,
    },
    # Too few updates: the round is skipped, so client 2's update went into no model.
    {"round": 4, "clients": [1, 2], "failed": {"1": "crashed"}, "rejected": {}, "skipped": True},
]


def test_counts_per_site() -> None:
    rows = site_table(PARTITION, HISTORY, {})
    counts = [
        (r["client"], r["images"], r["labelled"], r["sampled"], r["aggregated"], r["failed"])
        for r in rows
    ]
    assert counts == [(0, 100, 100, 3, 2, 1), (1, 40, 0, 3, 1, 1), (2, 7, 7, 4, 2, 1)]
    assert [r["rejected"] for r in rows] == [0, 1, 0]
    assert all("uniformity" not in r and "knn_acc" not in r for r in rows)


def test_metrics_of_a_central_and_a_federated_evaluation() -> None:
    central = {"uniformity_intra": [1.5, 2.0, None], "uniformity_intra_z": [3.0, 3.5, None]}
    rows = site_table(PARTITION, HISTORY, central)
    assert [r["uniformity"] for r in rows] == [1.5, 2.0, None]
    assert [r["uniformity_z"] for r in rows] == [3.0, 3.5, None]
    federated = {
        "federated": {
            "per_client": {
                "0": {"num_samples": 100, "knn_acc": 0.5, "uniformity": 1.25, "alignment": 0.25},
                "1": {"num_samples": 40, "uniformity": 2.5},
            }
        }
    }
    rows = site_table(PARTITION, HISTORY, federated)
    assert rows[0]["knn_acc"] == 0.5 and rows[0]["alignment"] == 0.25
    assert rows[1]["uniformity"] == 2.5 and "knn_acc" not in rows[1]
    assert "uniformity" not in rows[2]  # site 2 did not answer the evaluation
    text = format_site_table(rows).splitlines()
    assert text[0] == (
        "| client | images | labelled | rounds sampled | aggregated | failed | rejected "
        "| kNN acc % | -L_unif | L_align |"
    )
    assert text[2] == "| 0 | 100 | 100 | 3 | 2 | 1 | 0 | 50.00 | 1.250 | 0.250 |"
    assert text[4] == "| 2 | 7 | 7 | 4 | 2 | 1 | 0 | - | - | - |"
