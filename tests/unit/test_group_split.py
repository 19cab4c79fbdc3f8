"""The automatic validation split keeps exact and near duplicates on one side."""

from collections import Counter

import numpy as np
import pytest

from core.duplicates import duplicate_group_ids, near_duplicate_groups
from core.jobspec import JobSpec
from worker.training.data import split_indices, stratified_split

SEEDS = range(8)


def flip(h: int, *bits: int) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def planted(seed: int = 0, classes: int = 4, per_class: int = 40):
    """Entries with known duplicate groups: exact copies (same bytes), near copies (a few
    dHash bits apart, other bytes), a chain a~b~c whose ends are 6 bits apart, and a copy
    labelled with another class. Returns (entries, labels, groups as lists of indices)."""
    rng = np.random.default_rng(seed)
    entries, groups = [], []

    def add(label: int, dhash: int, sha: str, split: str | None = None) -> int:
        entries.append({"label": label, "sha256": sha, "dhash": dhash, "split": split})
        return len(entries) - 1

    for c in range(classes):
        for i in range(per_class):
            add(c, int(rng.integers(0, 2**63)), f"{c}-{i}")
        base = int(rng.integers(0, 2**63))
        groups.append([add(c, base, f"{c}-exact")] + [add(c, base, f"{c}-exact") for _ in "ab"])
        near = int(rng.integers(0, 2**63))
        groups.append([add(c, near, f"{c}-n0"), add(c, flip(near, 5), f"{c}-n1")])
        chain = int(rng.integers(0, 2**63))
        groups.append(
            [
                add(c, chain, f"{c}-c0"),
                add(c, flip(chain, 1, 2, 3), f"{c}-c1"),
                add(c, flip(chain, 1, 2, 3, 40, 41, 42), f"{c}-c2"),
            ]
        )
    mixed = int(rng.integers(0, 2**63))
    groups.append([add(0, mixed, "mixed"), add(0, mixed, "mixed"), add(1, mixed, "mixed")])
    return entries, [e["label"] for e in entries], groups


def sides(train: np.ndarray, val: np.ndarray, group: list[int]) -> set[str]:
    return {"train" if i in set(train.tolist()) else "val" for i in group}


@pytest.mark.parametrize("seed", SEEDS)
def test_planted_exact_and_near_duplicates_never_straddle_the_auto_split(seed):
    entries, labels, groups = planted(seed)
    train, val, test, record = split_indices(entries, labels, JobSpec(val_fraction=0.25, seed=seed))
    assert len(test) == 0 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(len(entries)))
    for group in groups:
        assert len(sides(train, val, group)) == 1, group
    assert record["duplicate_groups"] == len(groups)
    assert record["grouped_images"] == sum(len(g) for g in groups)
    assert record["cross_split_duplicates"] == 0


def test_some_duplicate_groups_land_in_validation_not_only_in_training():
    held_out = 0
    for seed in SEEDS:
        entries, labels, groups = planted(seed)
        train, val, _, _ = split_indices(entries, labels, JobSpec(val_fraction=0.25, seed=seed))
        held_out += sum(sides(train, val, g) == {"val"} for g in groups)
    assert held_out >= 4


@pytest.mark.parametrize("seed", SEEDS)
def test_stratification_roughly_holds_with_groups(seed):
    entries, labels, _ = planted(seed, classes=5, per_class=60)
    _, val, _, _ = split_indices(entries, labels, JobSpec(val_fraction=0.2, seed=seed))
    per_class, held = Counter(labels), Counter(labels[i] for i in val)
    for c, n in per_class.items():
        # Off by at most half the largest group (3 images) plus rounding.
        assert abs(held[c] - 0.2 * n) <= 2, (c, held[c], n)
    assert abs(len(val) - 0.2 * len(labels)) <= 4


def test_without_duplicates_each_class_holds_out_its_exact_share():
    labels = [0] * 50 + [1] * 21 + [2] * 9 + [3] * 2
    for seed in SEEDS:
        _, val = stratified_split(labels, 0.2, seed, groups=np.arange(len(labels)) * 7)
        held = Counter(labels[i] for i in val)
        assert held == {0: 10, 1: 4, 2: 2, 3: 1}


def test_no_groups_gives_the_same_split_as_singleton_groups():
    labels = np.random.default_rng(3).integers(0, 6, 200).tolist()
    for seed in SEEDS:
        plain = stratified_split(labels, 0.3, seed)
        grouped = stratified_split(labels, 0.3, seed, groups=np.arange(200) + 1000)
        assert all((a == b).all() for a, b in zip(plain, grouped, strict=True))


def test_the_same_seed_gives_the_same_grouped_split_and_another_seed_another():
    entries, labels, _ = planted(0)
    runs = [split_indices(entries, labels, JobSpec(val_fraction=0.25, seed=s)) for s in (5, 5, 6)]
    assert (runs[0][1] == runs[1][1]).all() and runs[0][3] == runs[1][3]
    assert set(runs[0][1]) != set(runs[2][1])


def test_tiny_classes_keep_a_validation_image_where_the_groups_allow():
    # class 0: 2 distinct images; class 1: one image; class 2: 3 copies of one picture;
    # class 3: two pictures with 3 copies each; class 4: plenty, so the split is not empty.
    labels = [0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3] + [4] * 10
    groups = [0, 1, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5] + list(range(10, 20))
    for seed in SEEDS:
        train, val = stratified_split(labels, 0.2, seed, groups)
        held = Counter(labels[i] for i in val)
        kept = Counter(labels[i] for i in train)
        assert held[0] == 1 and kept[0] == 1
        assert held[1] == 0 and kept[1] == 1
        assert held[2] == 0 and kept[2] == 3  # one picture: it cannot be split
        assert held[3] == 3 and kept[3] == 3  # the smaller unit goes, whole
        assert held[4] == 2


def test_a_mixed_label_group_follows_its_majority_label():
    labels = [0, 0, 1] + [0] * 10 + [1] * 10
    groups = [0, 0, 0] + list(range(1, 21))
    # The group counts as class 0 (13 images, 3 to hold out); class 1 keeps its own 10
    # images and holds out round(2.5) = 2 of them, whatever happens to the group.
    in_val = 0
    for seed in SEEDS:
        train, val = stratified_split(labels, 0.25, seed, groups)
        assert len({0, 1, 2} & set(val.tolist())) in (0, 3)
        in_val += 2 in val
        assert sum(i >= 13 for i in val) == 2
        assert sum(labels[i] == 0 for i in val) in (2, 3, 4)
    assert 0 < in_val < len(SEEDS)


def test_entries_without_hashes_are_split_as_single_images():
    entries, labels, groups = planted(1)
    for e in entries[::3]:
        del e["dhash"]
    for e in entries[1::3]:
        del e["sha256"]
    old = [{"label": i % 3, "split": None} for i in range(30)]  # an index from before hashes
    train, val, _, record = split_indices(old, [e["label"] for e in old], JobSpec(seed=2))
    assert record["duplicate_groups"] == 0 and record["grouped_images"] == 0
    assert Counter(old[i]["label"] for i in val) == {0: 2, 1: 2, 2: 2}
    train, val, _, record = split_indices(entries, labels, JobSpec(seed=2))
    assert record["duplicate_groups"] > 0
    ids = duplicate_group_ids(entries)
    for g in set(ids.tolist()):
        members = np.flatnonzero(ids == g).tolist()
        assert len(sides(train, val, members)) == 1


def test_exact_and_near_groups_join_transitively_across_entries_missing_a_hash():
    entries = [
        {"sha256": "x"},  # no dHash: joined by its bytes
        {"sha256": "x", "dhash": 0b1010},
        {"sha256": "y", "dhash": 0b1011},  # one bit from the previous: near copy
        {"dhash": 2**64 - 1},  # no sha256, far from everything
        {},
        {},
    ]
    assert duplicate_group_ids(entries).tolist() == [0, 0, 0, 3, 4, 5]


def test_a_given_validation_split_is_kept_and_its_straddling_duplicates_counted():
    entries, labels, groups = planted(4)
    exact, near = groups[0], groups[1]
    entries[exact[0]]["split"] = "val"  # 3 images of one group across train and val
    entries[near[1]]["split"] = "test"  # 2 images across train and test
    for e in entries[100:110]:
        e["split"] = "val"
    train, val, test, record = split_indices(entries, labels, JobSpec(seed=0))
    assert record["source"] == "given"
    assert set(val.tolist()) == {exact[0], *range(100, 110)} and test.tolist() == [near[1]]
    assert record["cross_split_duplicates"] == 5


def test_the_auto_split_counts_duplicates_that_reach_a_given_test_split():
    entries, labels, groups = planted(5)
    entries[groups[2][2]]["split"] = "test"
    train, val, test, record = split_indices(entries, labels, JobSpec(seed=1))
    assert record["source"] == "auto" and test.tolist() == [groups[2][2]]
    assert record["cross_split_duplicates"] == 3
    assert len(sides(train, val, groups[2][:2])) == 1


def test_near_duplicate_groups_match_a_brute_force_search_with_a_crowded_bucket():
    rng = np.random.default_rng(9)
    hashes = [int(h) for h in rng.integers(0, 2**63, 300)]
    hashes += [
        flip(hashes[i], int(b)) for i, b in zip(range(40), rng.integers(0, 64, 40), strict=True)
    ]
    # 200 hashes sharing their low 16 bits: one bucket larger than the vectorised path takes.
    crowd = [(int(h) << 16) | 0x1234 for h in rng.integers(0, 2**40, 200)]
    hashes += crowd + [flip(crowd[0], 30, 31)]
    parent = list(range(len(hashes)))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for i in range(len(hashes)):
        for j in range(i):
            if bin(hashes[i] ^ hashes[j]).count("1") <= 3:
                parent[find(i)] = find(j)
    expected = Counter(find(i) for i in range(len(hashes)))
    found = near_duplicate_groups(hashes)
    assert sorted(map(len, found)) == sorted(n for n in expected.values() if n > 1)
    assert all(len({find(i) for i in g}) == 1 for g in found)
    assert [0, 300] in found and [300 + 40, len(hashes) - 1] in found


def test_a_chain_of_hundreds_of_look_alikes_is_not_one_duplicate_group():
    """Tiny images (8x8 digits) hash alike by the hundred: such a chain is a class of
    look-alikes, not copies, and must not swallow the validation split."""
    from core.duplicates import MAX_NEAR_GROUP, duplicate_group_ids

    base = 0b1011_0110 << 8
    chain = [
        {"sha256": f"s{i}", "dhash": base ^ (1 << (i % 16)), "label": i % 2} for i in range(60)
    ]
    copies = [
        {"sha256": "same", "dhash": 7, "label": 0},
        {"sha256": "same", "dhash": 99, "label": 0},
    ]
    ids = duplicate_group_ids(chain + copies)
    assert len(set(ids[:60].tolist())) == 60  # the look-alikes stay single images
    assert ids[60] == ids[61]  # exact copies are still one group
    assert MAX_NEAR_GROUP < 60
