"""Exact and near duplicates among a dataset's images (numpy only).

Ingest reports them to the user (`service/ingest/report.py`); training keeps each group on one
side of an automatic validation split (`worker/training/data.py`). Index entries carry
`sha256` (the file's bytes) and `dhash` (a 64-bit difference hash of the picture); an entry
without one of them (an index written before it existed) is simply not grouped by it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

NEAR_DUPLICATE_BITS = 3  # dHash Hamming distance that counts as "the same picture"


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
    exactly on at least one chunk, so only bucket-mates are compared."""
    if len(hashes) < 2:
        return []
    values, inverse = np.unique(np.array(hashes, dtype=np.uint64), return_inverse=True)
    parent = list(range(len(values)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in _close_pairs(values, max_bits):
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, u in enumerate(np.ravel(inverse).tolist()):
        groups[find(u)].append(i)
    return [g for g in groups.values() if len(g) > 1]


_SMALL_BUCKET = 64


def _close_pairs(values: np.ndarray, max_bits: int) -> list[tuple[int, int]]:
    """Pairs (a, b), a != b, of distinct `values` within `max_bits` bits of each other.

    Small buckets (the usual case: a 16-bit chunk of random-looking hashes) are compared all
    at once, each member with the one d places after it in chunk order for d = 1, 2, ...;
    a large bucket (thousands of images that look alike) a block of rows at a time, so
    memory stays bounded."""
    pairs: list[tuple[int, int]] = []
    chunks = max_bits + 1
    width = 64 // chunks
    for c in range(chunks):
        bits = width if c < chunks - 1 else 64 - c * width
        keys = (values >> np.uint64(c * width)) & np.uint64((1 << bits) - 1)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1]
        sizes = np.diff(np.r_[starts, len(order)])
        large = sizes > _SMALL_BUCKET
        for start, size in zip(starts[large].tolist(), sizes[large].tolist(), strict=True):
            bucket = order[start : start + size]
            sub = values[bucket]
            for row in range(0, size, 512):
                ii, jj = np.nonzero(_bit_distance(sub[row : row + 512, None], sub) <= max_bits)
                pairs.extend(zip(bucket[ii + row].tolist(), bucket[jj].tolist(), strict=True))
        small = np.repeat(~large, sizes)
        for d in range(1, _SMALL_BUCKET):
            mates = (sorted_keys[:-d] == sorted_keys[d:]) & small[:-d]
            if not mates.any():
                break  # buckets are contiguous: no pair d apart means none further apart
            a, b = order[:-d][mates], order[d:][mates]
            close = _bit_distance(values[a], values[b]) <= max_bits
            pairs.extend(zip(a[close].tolist(), b[close].tolist(), strict=True))
    return [(a, b) for a, b in pairs if a != b]


def _bit_distance(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Hamming distance between uint64 arrays (broadcast)."""
    xor = np.ascontiguousarray(x ^ y)
    return np.unpackbits(xor.view(np.uint8), axis=-1).reshape(*xor.shape, 64).sum(-1)


# Near-duplicate groups larger than this are look-alikes, not copies (see below).
MAX_NEAR_GROUP = 16


def duplicate_group_ids(
    entries: Sequence[dict[str, Any]], max_bits: int = NEAR_DUPLICATE_BITS
) -> np.ndarray:
    """One group id per entry: entries that are exact or near copies of each other (either
    kind, transitively) share an id; every other entry has an id of its own. Ids are the
    smallest entry index of the group, so they are stable for a given index."""
    n = len(entries)
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:
            parent[x], x = root, int(parent[x])
        return root

    def union(members: Sequence[int]) -> None:
        roots = [find(i) for i in members]
        low = min(roots)
        for r in roots:
            parent[r] = low

    hashed = [i for i, e in enumerate(entries) if e.get("sha256")]
    for g in duplicate_groups([entries[i] for i in hashed]):
        union([hashed[j] for j in g])
    pictured = [i for i, e in enumerate(entries) if e.get("dhash") is not None]
    for g in near_duplicate_groups([int(entries[i]["dhash"]) for i in pictured], max_bits):
        # A chain of hundreds of "near copies" is a look-alike class (tiny digits hash
        # alike), not copies of one picture: kept apart, or it would swallow validation.
        if len(g) <= MAX_NEAR_GROUP:
            union([pictured[j] for j in g])
    return np.array([find(i) for i in range(n)], dtype=np.int64)
