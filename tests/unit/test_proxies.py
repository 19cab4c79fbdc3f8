"""The benchmark proxies (benchmarks/proxies.py): deterministic, honestly split, and built
as documented. Fast: builds arrays only, trains nothing."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks.proxies import PROXIES, build, read_split_zip

SINGLE = [p for p in PROXIES if p != "digits-pairs"]


@pytest.mark.parametrize("name", PROXIES)
def test_the_same_seed_builds_the_same_proxy(name: str) -> None:
    a, b = build(name, 1), build(name, 1)
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.train_idx, b.train_idx)
    assert np.array_equal(a.test_idx, b.test_idx)


@pytest.mark.parametrize("name", PROXIES)
def test_another_seed_draws_another_test_split(name: str) -> None:
    assert not np.array_equal(build(name, 0).test_idx, build(name, 1).test_idx) or (
        name == "digits-pairs"  # its pairs differ instead: indices are positional
        and not np.array_equal(build(name, 0).parts, build(name, 1).parts)
    )


@pytest.mark.parametrize("name", PROXIES)
def test_test_split_is_disjoint_from_train_and_covers_everything(name: str) -> None:
    p = build(name, 2)
    assert not set(p.train_idx.tolist()) & set(p.test_idx.tolist())
    assert sorted([*p.train_idx.tolist(), *p.test_idx.tolist()]) == list(range(len(p.images)))


@pytest.mark.parametrize("name", SINGLE)
def test_test_split_is_stratified(name: str) -> None:
    p = build(name, 0)
    for cls in range(len(p.classes)):
        n = int(np.sum(p.labels == cls))
        n_test = int(np.sum(p.labels[p.test_idx] == cls))
        assert abs(n_test - 0.2 * n) <= 1, (cls, n, n_test)


def test_degraded_digits_differ_from_the_originals_but_keep_their_labels() -> None:
    native, degraded = build("digits", 0), build("digits-degraded", 0)
    assert native.images.shape[1:] == (8, 8)
    assert degraded.images.shape[1:] == (16, 16)
    assert np.array_equal(native.labels, degraded.labels)
    # Compared at the same size, the degraded images are far from the originals.
    down = degraded.images.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4))
    diff = np.abs(down - native.images.astype(float)).mean(axis=(1, 2))
    assert (diff > 5).mean() > 0.95
    # ...and depend on the seed, while the native digits do not.
    assert not np.array_equal(degraded.images, build("digits-degraded", 1).images)
    assert np.array_equal(native.images, build("digits", 1).images)


def test_multilabel_pairs_are_labelled_with_the_digits_drawn() -> None:
    from sklearn.datasets import load_digits

    targets = load_digits().target
    p = build("digits-pairs", 0)
    assert p.multilabel and p.parts is not None
    assert p.images.shape[1:] == (8, 16)
    for label, (left, right) in zip(p.labels, p.parts, strict=True):
        assert set(np.flatnonzero(label)) == {targets[left], targets[right]}
    # Both halves of the image are the drawn digits.
    digits = (load_digits().images * (255.0 / 16.0)).round().astype(np.uint8)
    assert np.array_equal(p.images[:, :, :8], digits[p.parts[:, 0]])
    assert np.array_equal(p.images[:, :, 8:], digits[p.parts[:, 1]])


def test_multilabel_test_pairs_use_no_digit_seen_in_training() -> None:
    p = build("digits-pairs", 1)
    assert p.parts is not None
    train_digits = set(p.parts[p.train_idx].ravel().tolist())
    test_digits = set(p.parts[p.test_idx].ravel().tolist())
    assert not train_digits & test_digits


def test_label_noise_flips_only_training_labels_at_the_rate_asked() -> None:
    clean, noisy = build("digits", 0), build("digits", 0, label_noise=0.2)
    assert np.array_equal(noisy.test_idx, clean.test_idx)
    assert np.array_equal(noisy.labels[noisy.test_idx], clean.labels[clean.test_idx])
    changed = np.flatnonzero(noisy.labels != clean.labels)
    assert np.array_equal(changed, noisy.flipped)
    assert set(changed.tolist()) <= set(noisy.train_idx.tolist())
    assert len(changed) == round(0.2 * len(noisy.train_idx))
    assert noisy.label_noise == pytest.approx(0.2, abs=1e-3)


def test_per_class_keeps_that_many_of_each_class() -> None:
    p = build("digits", 0, per_class=20)
    assert np.bincount(p.labels).tolist() == [20] * 10


def test_splits_zip_holds_train_and_test_with_their_classes(tmp_path: Path) -> None:
    p = build("lfw", 0)
    path = p.write_splits_zip(tmp_path / "upload.zip")
    with zipfile.ZipFile(path) as zf:
        tops = {n.split("/", 1)[0] for n in zf.namelist()}
    assert tops == {"train", "test"}
    test_images, names = read_split_zip(path, "test")
    assert len(test_images) == len(p.test_idx)
    expected = sorted(p.classes[int(p.labels[i])] for i in p.test_idx)
    assert sorted(names) == expected
    train_images, _ = read_split_zip(path, "train")
    assert np.array_equal(np.asarray(train_images[0]), p.images[p.train_idx[0]])
