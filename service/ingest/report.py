"""What we tell the user about a dataset: counts, sizes, duplicates and leakage."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

import numpy as np

NEAR_DUPLICATE_BITS = 3  # dHash Hamming distance that counts as "the same picture"
MAX_GROUPS = 100


def duplicate_groups(entries: list[dict[str, Any]]) -> list[list[int]]:
    """Indices of entries with identical bytes, groups of two or more."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(entries):
        by_hash[e["sha256"]].append(i)
    return [g for g in by_hash.values() if len(g) > 1]


def near_duplicate_groups(
    hashes: list[int], max_bits: int = NEAR_DUPLICATE_BITS
) -> list[list[int]]:
    """Groups of indices whose dHashes are within `max_bits` of each other (transitively).

    Pigeonhole: split the 64 bits into max_bits+1 chunks; two hashes that close agree
    exactly on at least one chunk, so only bucket-mates are compared, a block of rows at a
    time (memory stays bounded even when thousands of images look alike)."""
    if len(hashes) < 2:
        return []
    values, inverse = np.unique(np.array(hashes, dtype=np.uint64), return_inverse=True)
    parent = list(range(len(values)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    chunks = max_bits + 1
    width = 64 // chunks
    for c in range(chunks):
        bits = width if c < chunks - 1 else 64 - c * width
        keys = (values >> np.uint64(c * width)) & np.uint64((1 << bits) - 1)
        order = np.argsort(keys, kind="stable")
        bounds = np.flatnonzero(np.diff(keys[order])) + 1
        for bucket in np.split(order, bounds):
            if len(bucket) < 2:
                continue
            sub = values[bucket]
            for start in range(0, len(bucket), 512):
                xor = sub[start : start + 512, None] ^ sub[None, :]
                dist = np.unpackbits(xor.view(np.uint8), axis=-1).reshape(*xor.shape, 64).sum(-1)
                ii, jj = np.nonzero(dist <= max_bits)
                for a, b in zip(bucket[ii + start].tolist(), bucket[jj].tolist(), strict=True):
                    if a != b:
                        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(inverse.tolist()):
        groups[find(u)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def build_report(entries: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    def describe(group: list[int]) -> list[dict[str, Any]]:
        return [
            {
                "path": entries[i]["source"],
                "class": classes[entries[i]["label"]],
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
    conflicting = [g for g in exact if len({entries[i]["label"] for i in g}) > 1]

    per_split: dict[str, dict[str, int]] = defaultdict(lambda: {c: 0 for c in classes})
    for e in entries:
        per_split[e["split"] or "unsplit"][classes[e["label"]]] += 1
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
