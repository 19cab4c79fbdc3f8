"""Datasets for training: images decoded once into a compact pre-resized cache.

The cache is a uint8 memmap of shape (N, S, S, 3), S = image_size / crop_pct, written
once per (dataset, S) and reused by every job on that host. Memory stays bounded however
large the dataset: pages are read on demand, and decoding never bounds an epoch.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.duplicates import duplicate_group_ids
from core.imaging import resize_center_crop, to_rgb  # noqa: F401  (re-exported)
from core.jobspec import JobSpec
from worker.training.augment import eval_transform, train_transform
from worker.training.multilabel import targets_matrix

log = logging.getLogger(__name__)

MULTI_LABEL = "multi-label"  # an index's `task` (service/ingest/manifest.py)


def build_image_cache(
    archive: Path,
    paths: Sequence[str],
    size: int,
    out: Path,
    interpolation: str = "bicubic",
    on_progress: Callable[[int, int], None] | None = None,
) -> np.memmap:
    """Decode every image of `archive` once into `out` (atomic: a crash leaves no half cache)."""
    if out.is_file():
        return open_image_cache(out, len(paths), size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".{os.getpid()}.part")
    cache = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3)
    )
    with zipfile.ZipFile(archive) as zf:
        for i, name in enumerate(paths):
            with zf.open(name) as f, Image.open(f) as img:
                cache[i] = resize_center_crop(img, size, interpolation)
            if on_progress is not None and (i % 256 == 0 or i == len(paths) - 1):
                on_progress(i + 1, len(paths))
    cache.flush()
    del cache
    os.replace(tmp, out)
    return open_image_cache(out, len(paths), size)


def open_image_cache(path: Path, n: int, size: int) -> np.memmap:
    cache = np.load(path, mmap_mode="r")
    if cache.shape != (n, size, size, 3):
        raise ValueError(
            f"image cache {path} has shape {cache.shape}, expected {(n, size, size, 3)}"
        )
    return cache  # type: ignore[no-any-return]


def stratified_split(
    labels: Sequence[int],
    val_fraction: float,
    seed: int,
    groups: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, hold out about round(val_fraction * n) images (at least one when n >= 2 and
    the class has two groups or more), never splitting a group.

    Images sharing a `groups` id (exact or near copies) move as one unit, stratified by the
    unit's majority label. A unit goes to validation when that brings the class's count
    closer to its target, so with no groups (all units of one image) this is exactly a
    per-class seeded shuffle-and-cut, the same split as before groups were considered."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    if len(labels_arr) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    unit_of, unit_label, sizes = _units(labels_arr, groups)
    in_val = np.zeros(len(sizes), dtype=bool)
    for cls in np.unique(unit_label):
        units = np.flatnonzero(unit_label == cls)
        rng.shuffle(units)
        n = int(sizes[units].sum())
        target = int(round(val_fraction * n))
        target = min(max(target, 1 if n >= 2 else 0), n - 1)
        taken = 0
        for u in units[:-1]:  # the last unit of the shuffle always stays in training
            if sizes[u] < 2 * (target - taken):
                in_val[u] = True
                taken += int(sizes[u])
        if taken == 0 and target > 0 and len(units) >= 2:
            # Every unit was larger than the target: hold out the smallest one.
            in_val[units[np.argmin(sizes[units])]] = True
    val_mask = in_val[unit_of]
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def _units(
    labels: np.ndarray, groups: Sequence[int] | np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(unit of each image, each unit's majority label, each unit's size). Without groups,
    every image is its own unit. A tie in the majority goes to the smallest label."""
    if groups is None:
        return np.arange(len(labels)), labels, np.ones(len(labels), dtype=np.int64)
    _, unit_of = np.unique(np.asarray(groups), return_inverse=True)
    classes, cls_of = np.unique(labels, return_inverse=True)
    pairs, counts = np.unique(unit_of * len(classes) + cls_of, return_counts=True)
    pair_unit, pair_cls = np.divmod(pairs, len(classes))
    order = np.lexsort((pair_cls, -counts, pair_unit))
    first = order[np.r_[True, pair_unit[order][1:] != pair_unit[order][:-1]]]
    return unit_of, classes[pair_cls[first]], np.bincount(unit_of)


def _straddling_images(groups: np.ndarray, parts: Sequence[np.ndarray]) -> int:
    """How many images of `parts` (disjoint index arrays: train, val, test) belong to a group
    that has members in more than one part."""
    idx = np.concatenate(parts)
    side = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)])
    g = groups[idx]
    pairs = np.unique(np.stack([g, side], axis=1), axis=0)
    spread, n_sides = np.unique(pairs[:, 0], return_counts=True)
    return int(np.isin(g, spread[n_sides > 1]).sum())


Target = int | torch.Tensor  # a class index, or (multi-label) a float multi-hot row


class CachedImages(Dataset[tuple[torch.Tensor, Target]]):
    """Cached images and their targets: class indices, or with `targets` (multi-label) the
    rows of that float32 multi-hot matrix (images x classes)."""

    def __init__(
        self,
        cache: np.ndarray,
        labels: Sequence[int],
        indices: np.ndarray,
        transform: Any,
        targets: np.ndarray | None = None,
    ):
        self.cache = cache
        self.labels = np.asarray(labels, dtype=np.int64)
        self.indices = indices
        self.transform = transform
        self.targets = targets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        j = int(self.indices[i])
        img = torch.from_numpy(np.array(self.cache[j])).permute(
            2, 0, 1
        )  # copy: the memmap is read-only
        if self.targets is not None:
            return self.transform(img), torch.from_numpy(self.targets[j].copy())
        return self.transform(img), int(self.labels[j])


@dataclass
class PreparedData:
    """What `fit` trains on: the cache, labels, class names and the split. A multi-label
    dataset (`multilabel`) also has `targets`, its float32 multi-hot matrix, which the
    datasets hand out; `labels` is then each image's first class (for stratifying)."""

    cache: np.ndarray
    labels: list[int]
    classes: list[str]
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray | None = None
    split: dict[str, Any] | None = None
    multilabel: bool = False
    targets: np.ndarray | None = None

    def _images(self, idx: np.ndarray, transform: Any) -> CachedImages:
        return CachedImages(self.cache, self.labels, idx, transform, self.targets)

    def train_set(self, config: JobSpec) -> CachedImages:
        return self._images(self.train_idx, train_transform(config))

    def eval_train_set(self, config: JobSpec) -> CachedImages:
        """The training images without augmentation (for cached features)."""
        return self._images(self.train_idx, eval_transform(config))

    def val_set(self, config: JobSpec) -> CachedImages:
        return self._images(self.val_idx, eval_transform(config))

    def test_set(self, config: JobSpec) -> CachedImages | None:
        if self.test_idx is None or len(self.test_idx) == 0:
            return None
        return self._images(self.test_idx, eval_transform(config))


def prepare(
    archive: Path,
    index: dict[str, Any],
    config: JobSpec,
    cache_dir: Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> PreparedData:
    entries = index["entries"]
    paths = [e["path"] for e in entries]
    labels = [int(e["label"]) for e in entries]
    size = config.resize_size
    cache = build_image_cache(
        archive,
        paths,
        size,
        cache_dir / f"images_{size}_{config.spec.interpolation}.npy",
        config.spec.interpolation,
        on_progress,
    )
    train_idx, val_idx, test_idx, split = split_indices(entries, labels, config)
    if config.max_train_images is not None and len(train_idx) > config.max_train_images:
        train_idx = balanced_subset(train_idx, labels, config.max_train_images, config.seed)
        split["train_used"] = int(len(train_idx))
    log.info(
        "prepared %d images (%d train / %d val / %d test, %s split) at %dpx",
        len(paths),
        len(train_idx),
        len(val_idx),
        len(test_idx),
        split["source"],
        size,
    )
    classes = list(index["classes"])
    multilabel = index.get("task") == MULTI_LABEL
    targets = None
    if multilabel:
        # The split stays stratified on `labels`, each image's first class.
        targets = targets_matrix([e.get("labels") or [e["label"]] for e in entries], len(classes))
    return PreparedData(
        cache, labels, classes, train_idx, val_idx, test_idx, split, multilabel, targets
    )


def balanced_subset(idx: np.ndarray, labels: list[int], k: int, seed: int) -> np.ndarray:
    """`k` of `idx`, taken round robin over the classes (each class's order seeded), so
    every class keeps as many images as it can."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)[idx]
    queues = [list(rng.permutation(idx[y == c])) for c in np.unique(y)]
    out: list[int] = []
    while len(out) < k and any(queues):
        for q in queues:
            if q and len(out) < k:
                out.append(int(q.pop()))
    return np.sort(np.asarray(out, dtype=idx.dtype))


def split_indices(
    entries: list[dict[str, Any]], labels: list[int], config: JobSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The dataset's own train/val/test split when it has one; otherwise a stratified,
    seeded validation split out of the training images that keeps every group of exact or
    near duplicates on one side (recorded with the job, with the number of groups kept
    together and of images whose group still spans two of the final splits)."""
    splits = np.array([e.get("split") or "train" for e in entries])
    test_idx = np.flatnonzero(splits == "test")
    given_val = np.flatnonzero(splits == "val")
    pool = np.flatnonzero(splits == "train")
    groups = duplicate_group_ids(entries)
    record: dict[str, Any]
    if len(given_val):
        record = {"source": "given"}
        train_idx, val_idx = pool, given_val
    else:
        sub_train, sub_val = stratified_split(
            [labels[i] for i in pool], config.val_fraction, config.seed, groups[pool]
        )
        train_idx, val_idx = pool[sub_train], pool[sub_val]
        _, sizes = np.unique(groups[pool], return_counts=True)
        record = {
            "source": "auto",
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "duplicate_groups": int((sizes > 1).sum()),
            "grouped_images": int(sizes[sizes > 1].sum()),
        }
    record.update(
        train=int(len(train_idx)),
        val=int(len(val_idx)),
        test=int(len(test_idx)),
        cross_split_duplicates=_straddling_images(groups, [train_idx, val_idx, test_idx]),
    )
    return train_idx, val_idx, test_idx, record
