"""Label issues (worker/training/label_issues.py): labels flipped on purpose in real data
(scikit-learn's digits, their 64 pixels as features) are what confident learning lists
first, folds keep duplicate groups whole, and the sheets are drawn."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from torch import nn

from core.jobspec import JobSpec
from worker.training.data import PreparedData
from worker.training.fit import FitResult
from worker.training.label_issues import (
    LabelIssuesSkipped,
    find_label_issues,
    fold_splits,
    power_normalise,
    top_losses,
)
from worker.training.sheets import Tile, issues_sheet, sheet_png

CLASSES = [str(c) for c in range(10)]


def digits_job(rate: float = 0.05, seed: int = 0, probe: bool = True):
    """(FitResult, PreparedData, paths, flipped): 1,400 training digits of which `rate` have
    another class's label, the rest validation; the probe's cache holds the pixels."""
    d = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(d.target))
    train_idx, val_idx = np.sort(order[:1400]), np.sort(order[1400:])
    flipped = rng.choice(train_idx, int(rate * len(train_idx)), replace=False)
    labels = d.target.copy()
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, len(flipped))) % 10
    images = np.repeat((d.images * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)
    data = PreparedData(images, labels.tolist(), CLASSES, train_idx, val_idx)
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.as_tensor(labels)
    val_logits = torch.randn(len(val_idx), 10, generator=torch.Generator().manual_seed(seed))
    result = FitResult(
        nn.Identity(),
        CLASSES,
        [],
        {},
        probe_cache=(x[train_idx], y[train_idx], x[val_idx], y[val_idx], 1e-2) if probe else None,
        val_logits=(val_logits, y[val_idx]),
    )
    paths = [f"train/{CLASSES[c]}/{i:05d}.png" for i, c in enumerate(labels)]
    return result, data, paths, flipped, d.target


def test_flipped_digits_are_listed_first_with_their_true_class_suggested():
    result, data, paths, flipped, truth = digits_job()
    found = find_label_issues(result, data, JobSpec(), paths)
    first = [item["index"] for item in found.issues[: 2 * len(flipped)]]
    recall = len(set(first) & set(flipped.tolist())) / len(flipped)
    assert recall >= 0.7, recall
    # Checked: the training and the validation images.
    assert found.features == "probe" and found.folds == 5 and found.images == 1797
    scores = [item["score"] for item in found.issues]
    assert scores == sorted(scores), "most suspect (lowest label quality) first"
    caught = [item for item in found.issues if item["index"] in set(flipped.tolist())]
    right = [item["suggested_label"] == CLASSES[truth[item["index"]]] for item in caught]
    assert np.mean(right) > 0.8
    item = found.issues[0]
    assert item["path"] == paths[item["index"]] and item["given_label"] != item["suggested_label"]
    assert sum(found.per_class.values()) == len(found.issues)
    assert found.summary()["count"] == len(found.issues)


def test_the_probes_see_the_signed_square_roots_of_the_features_and_say_so():
    assert power_normalise(torch.tensor([-4.0, 0.0, 0.25, 9.0])).tolist() == [-2, 0, 0.5, 3]
    result, data, paths, flipped, _ = digits_job()
    found = find_label_issues(result, data, JobSpec(), paths, sheets=False)
    raw = find_label_issues(result, data, JobSpec(), paths, sheets=False, power=False)
    assert found.summary()["transform"] == "signed square root"
    assert raw.summary()["transform"] == "none"
    # Different probabilities, so a different list (both find the flipped digits).
    assert [i["index"] for i in found.issues] != [i["index"] for i in raw.issues]


def test_clean_labels_give_few_issues():
    result, data, paths, _, _ = digits_job(rate=0.0)
    found = find_label_issues(result, data, JobSpec(), paths, sheets=False)
    assert len(found.issues) < 0.04 * found.images


class PooledPixels(nn.Module):
    """A stand-in backbone with timm's feature API: the grey pixels, flattened."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.flatten(1)


def test_without_the_probes_cache_the_models_own_features_are_used():
    result, data, paths, flipped, _ = digits_job(probe=False)
    result.model = PooledPixels()
    spec = JobSpec(image_size=32)  # the 8-px digits, centred in zeros
    found = find_label_issues(result, data, spec, paths, sheets=False)
    assert found.features == "model" and found.images == 1797
    first = {item["index"] for item in found.issues[: 2 * len(flipped)]}
    assert len(first & set(flipped.tolist())) / len(flipped) >= 0.7


def test_duplicate_groups_never_straddle_folds():
    rng = np.random.default_rng(0)
    strata = rng.integers(0, 3, 300)
    groups = np.arange(300)
    groups[100:160] = np.repeat(np.arange(100, 130), 2)  # 30 pairs of copies
    for train, held in fold_splits(strata, groups, 5, seed=0):
        assert not set(groups[train]) & set(groups[held])


def test_one_class_cannot_be_checked():
    with pytest.raises(LabelIssuesSkipped, match="two classes"):
        fold_splits(np.zeros(50, dtype=np.int64), None, 5, 0)


def test_a_missing_multilabel_class_is_found():
    """Pairs of digits labelled with both classes; 40 images lose one of their labels. The
    features: each digit's class probabilities by a logistic regression, summed over the
    pair (nearly perfect, so the features' own mistakes do not hide the planted ones)."""
    d = load_digits()
    rng = np.random.default_rng(1)
    pairs = rng.integers(0, len(d.target), (1200, 2))
    proba = LogisticRegression(max_iter=500).fit(d.data, d.target).predict_proba(d.data)
    x = torch.tensor(proba[pairs[:, 0]] + proba[pairs[:, 1]]).float()
    targets = np.zeros((1200, 10), dtype=np.float32)
    targets[np.arange(1200), d.target[pairs[:, 0]]] = 1
    targets[np.arange(1200), d.target[pairs[:, 1]]] = 1
    two = np.flatnonzero(targets.sum(1) == 2)
    dropped = rng.choice(two[two < 1000], 40, replace=False)
    targets[dropped, d.target[pairs[dropped, 1]]] = 0
    labels = targets.argmax(1)
    train_idx, val_idx = np.arange(1000), np.arange(1000, 1200)
    images = np.zeros((1200, 8, 16, 3), dtype=np.uint8)
    data = PreparedData(images, labels.tolist(), CLASSES, train_idx, val_idx, None, None, True)
    data.targets = targets
    t = torch.as_tensor(targets)
    result = FitResult(
        nn.Identity(),
        CLASSES,
        [],
        {},
        probe_cache=(x[train_idx], t[train_idx], x[val_idx], t[val_idx], 1e-2),
        val_logits=(torch.zeros(200, 10), t[val_idx]),
    )
    found = find_label_issues(result, data, JobSpec(), [f"{i}.png" for i in range(1200)])
    listed = {item["index"] for item in found.issues}
    caught = len(listed & set(dropped.tolist()))
    assert caught / len(dropped) >= 0.6 and caught / len(listed) >= 0.8, (caught, len(listed))
    assert isinstance(found.issues[0]["given_label"], list)
    assert found.top_losses and isinstance(found.top_losses[0]["predicted_label"], list)


def test_top_losses_are_the_most_wrong_first():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 0.0], [0.0, 0.1]])
    targets = torch.tensor([0, 0, 0, 1])
    ranked = top_losses(logits, targets)
    assert [r[0] for r in ranked] == [1, 3, 2, 0]
    position, loss, predicted, prob = ranked[0]
    assert predicted == 1 and prob > 0.98 and loss > 4


def test_the_sheet_is_a_png_that_survives_odd_names():
    tile = Tile(np.zeros((8, 8), dtype=np.uint8), 1, "a/" * 40 + "x.png", ["given: $\\bad$"])
    big = Tile(np.full((300, 200, 3), 200, dtype=np.uint8), 2, "b.png", ["given: ä", "x", "y"])
    png = sheet_png([tile, big], "title")
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.width > 2 * 128
    none = Image.open(io.BytesIO(issues_sheet([], 50, np.zeros((1, 8, 8, 3), np.uint8))))
    assert none.height < 60  # the title alone, saying none was flagged


class MemoryStore:
    def __init__(self, fail: bool = False):
        self.objects: dict[str, bytes] = {}
        self.fail = fail

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.fail:
            raise OSError("the store is down")
        self.objects[key] = data


def attempt(store: MemoryStore):
    """What `worker.label_issues` reads of an attempt."""
    from types import SimpleNamespace

    claim = SimpleNamespace(
        job_id="job_x", dataset_id="ds", archive_key="a", index_key="i", prior_seconds=0.0
    )
    reporter = SimpleNamespace(on_phase=lambda phase: None)
    return SimpleNamespace(
        claim=claim, job_id="job_x", settings=None, store=store, reporter=reporter, ran=lambda: 20.0
    )


def trained_digits(monkeypatch):
    import worker.label_issues as wiring
    from worker.attempt import Trained

    result, data, paths, _, _ = digits_job()
    entries = [{"path": f"images/{i:07d}.png", "source": p} for i, p in enumerate(paths)]
    monkeypatch.setattr(wiring, "fetch_dataset", lambda *a: (None, {"entries": entries}))
    return Trained(JobSpec(), data, result)  # type: ignore[arg-type]


def test_the_worker_stores_the_list_and_sheets_and_summarises(monkeypatch):
    import json

    from worker.ending import EndReason
    from worker.label_issues import label_issues

    store = MemoryStore()
    summary = label_issues(attempt(store), trained_digits(monkeypatch), EndReason.SUCCEEDED)
    doc = json.loads(store.objects["jobs/job_x/label_issues.json"])
    assert summary["count"] == len(doc["issues"]) > 0 and 0 < summary["share_of_job"] < 0.5
    assert doc["issues"][0]["path"].startswith("train/")  # the path as uploaded
    for name in ("label_issues", "top_losses"):
        assert store.objects[f"jobs/job_x/plots/{name}.png"].startswith(b"\x89PNG")


def test_a_failure_is_recorded_never_raised_and_a_canceled_job_is_skipped(monkeypatch):
    from worker.ending import EndReason
    from worker.label_issues import label_issues

    trained = trained_digits(monkeypatch)
    failed = label_issues(attempt(MemoryStore(fail=True)), trained, EndReason.SUCCEEDED)
    assert "the store is down" in failed["error"]
    skipped = label_issues(attempt(MemoryStore()), trained, EndReason.CANCELED_KEEP)
    assert "canceled (stop-and-keep)" in skipped["skipped"]


def test_the_folds_keep_groups_whole_and_every_class_spread():
    """Groups go whole to one fold, stratified by class; every image is held out once."""
    rng = np.random.default_rng(1)
    strata = np.repeat(np.arange(4), 100)
    groups = np.arange(400)
    copies = np.arange(0, 399, 7)  # every 7th image copies its neighbour, class and all
    groups[copies], strata[copies] = groups[copies + 1], strata[copies + 1]
    order = rng.permutation(400)
    strata, groups = strata[order], groups[order]
    splits = fold_splits(strata, groups, 5, seed=0)
    assert len(splits) == 5
    held = np.concatenate([part for _, part in splits])
    assert sorted(held.tolist()) == list(range(400))  # each image held out exactly once
    for train, part in splits:
        assert not set(groups[train]) & set(groups[part])
        assert len(set(train.tolist()) | set(part.tolist())) == 400
        counts = np.bincount(strata[part], minlength=4)
        assert counts.min() >= 15 and counts.max() <= 25, counts  # about 20 a class a fold


def test_copies_of_one_image_are_skipped_not_an_error():
    with pytest.raises(LabelIssuesSkipped, match="copy of one image"):
        fold_splits(np.array([0, 1, 0, 1]), np.zeros(4, dtype=np.int64), 5, 0)
