"""What we tell the user about a dataset: counts, sizes, duplicates and leakage."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from core.duplicates import duplicate_groups, near_duplicate_groups

MAX_GROUPS = 100


def labels_of(entry: dict[str, Any]) -> list[int]:
    """An entry's class indices: its `labels` (multi-label), else its one `label`."""
    return entry.get("labels") or [entry["label"]]


def build_report(entries: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    def describe(group: list[int]) -> list[dict[str, Any]]:
        return [
            {
                "path": entries[i]["source"],
                # A multi-label image's classes, written as its manifest writes them.
                "class": "|".join(classes[c] for c in labels_of(entries[i])),
                "split": entries[i]["split"],
            }
            for i in group
        ]

    exact = duplicate_groups(entries)
    # Near groups worth reporting hold at least two different files (not only exact copies).
    near_groups = [
        g
        for g in near_duplicate_groups([e["dhash"] for e in entries])
        if len({entries[i]["sha256"] for i in g}) > 1
    ]

    leakage = [g for g in exact + near_groups if len({entries[i]["split"] for i in g}) > 1]
    conflicting = [g for g in exact if len({tuple(labels_of(entries[i])) for i in g}) > 1]

    # A multi-label image counts once for each of its classes.
    per_split: dict[str, dict[str, int]] = defaultdict(lambda: {c: 0 for c in classes})
    labelled = 0
    for e in entries:
        for c in labels_of(e):
            per_split[e["split"] or "unsplit"][classes[c]] += 1
            labelled += 1
    totals = [sum(per_split[s][c] for s in per_split) for c in classes]
    widths = [e["w"] for e in entries]
    heights = [e["h"] for e in entries]

    def dist(values: list[int]) -> dict[str, float]:
        return {
            "min": min(values),
            "median": statistics.median(values),
            "max": max(values),
        }

    return {
        "counts": {split: dict(counts) for split, counts in sorted(per_split.items())},
        "imbalance_ratio": round(max(totals) / max(1, min(totals)), 3),
        "label_cardinality": round(labelled / max(1, len(entries)), 3),  # labels per image
        "image_sizes": {"width": dist(widths), "height": dist(heights)},
        "duplicates": {
            "exact_groups": len(exact),
            "near_groups": len(near_groups),
            "exact": [describe(g) for g in exact[:MAX_GROUPS]],
            "near": [describe(g) for g in near_groups[:MAX_GROUPS]],
        },
        "leakage": {
            "groups": len(leakage),
            "detail": "the same image (or a near copy) sits in more than one split: "
            "validation/test scores will be optimistic"
            if leakage
            else None,
            "examples": [describe(g) for g in leakage[:MAX_GROUPS]],
        },
        "conflicting_labels": {
            "groups": len(conflicting),
            "examples": [describe(g) for g in conflicting[:MAX_GROUPS]],
        },
    }
