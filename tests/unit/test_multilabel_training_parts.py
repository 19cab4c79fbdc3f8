"""The pieces that carry multi-label datasets through training, on small hand-made cases:
the probe's solver, loss weights, sampler weights, selection, epoch rows, metadata and the
benchmark's manifest upload. (End to end: tests/training/test_multilabel_training.py.)"""

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.proxies import build_pairs, pad_square
from core.jobspec import EarlyStopping, JobSpec
from tests.helpers import ingest_bytes
from worker.training.callbacks import Callbacks
from worker.training.export import build_metadata
from worker.training.linear import fit_linear
from worker.training.loop import EpochStats
from worker.training.metrics import evaluate
from worker.training.multilabel import (
    MAX_POS_WEIGHT,
    bce_loss,
    pos_weights,
    sample_weights,
    subset_correct,
)
from worker.training.plots import curves_png
from worker.training.selection import EpochRecord, epoch_metrics, selection_metric

STATS = EpochStats(0.5, 0.25, 100, 2.0, 0.5, steps=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny solves: with two intra-op threads on a busy machine they spin and wait on each
    other (seconds instead of milliseconds); the results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_solver_fits_one_logistic_regression_per_class_and_scores_folds_by_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g)
    y = (x[:, :4] > 0.3).float()  # class c present when feature c is high
    y[y.sum(1) == 0, 0] = 1.0  # every image has a class, as ingest requires
    fit = fit_linear(x * 10 + 3, y, 4, bce_loss(), seed=0)
    predicted = fit.logits(x * 10 + 3) >= 0
    assert (predicted == (y > 0.5)).float().mean() > 0.95
    assert fit.cv_metric == "map" and fit.folds == 3
    assert set(fit.summary()) >= {"cv_map", "penalty"} and "cv_accuracy" not in fit.summary()
    assert all(0.8 < s <= 1.0 for s in fit.cv_scores.values())


def test_the_single_label_solver_still_reports_cv_accuracy():
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(1))
    y = torch.arange(3).repeat(20)
    assert "cv_accuracy" in fit_linear(x, y, 3, nn.CrossEntropyLoss()).summary()


def test_pos_weights_are_negatives_over_positives_clipped():
    y = np.zeros((200, 3), dtype=np.float32)
    y[:50, 0] = 1  # 150 / 50 = 3
    y[:1, 1] = 1  # 199 / 1, clipped
    w = pos_weights(y)  # class 2 has no positive: 1
    assert w.tolist() == pytest.approx([3.0, MAX_POS_WEIGHT, 1.0])


def test_label_smoothing_pulls_every_target_towards_one_half():
    x = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    smoothed = y * 0.8 + 0.1
    expected = nn.functional.binary_cross_entropy_with_logits(x, smoothed)
    assert float(bce_loss(label_smoothing=0.2)(x, y)) == pytest.approx(float(expected))
    assert type(bce_loss(label_smoothing=0.0)) is nn.BCEWithLogitsLoss


def test_a_balanced_sampler_draws_images_of_rare_classes_more_often():
    y = np.array([[1, 0], [1, 0], [1, 0], [1, 1], [0, 0]], dtype=np.float32)
    w = sample_weights(y)
    assert w[3] == pytest.approx(1.0) and w[0] == pytest.approx(0.25)  # rare class 1: 1 image
    assert w[4] == pytest.approx(0.25)  # no class: weighs as the commonest


def test_training_accuracy_is_subset_accuracy_at_one_half():
    logits = torch.tensor([[2.0, -1.0], [2.0, 1.0], [-3.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert int(subset_correct(logits, targets)) == 2  # logit 0 is probability 0.5: positive


def test_a_multi_label_run_selects_by_val_map_unless_the_user_chose_otherwise():
    assert selection_metric(JobSpec(), multilabel=True) == "val_map"
    assert selection_metric(JobSpec(), multilabel=False) == "val_accuracy"
    by_loss = JobSpec(early_stopping=EarlyStopping(metric="val_loss"))
    assert selection_metric(by_loss, multilabel=True) == "val_loss"

    record = EpochRecord(JobSpec(), Callbacks(), multilabel=True)
    model = nn.Linear(2, 2)
    record.add({"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5, "val_map": 0.6}, model)
    record.add({"epoch": 2, "train_loss": 0.9, "val_accuracy": 0.4, "val_map": 0.7}, model)
    assert record.best.metrics["epoch"] == 2


def test_a_multi_label_epoch_row_keeps_val_accuracy_as_subset_accuracy():
    logits = torch.tensor([[3.0, -3.0], [3.0, 3.0], [-3.0, 3.0], [3.0, -3.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    report = evaluate(logits, targets, ["a", "b"], multilabel=True)
    assert report["task"] == "multi-label"
    row = epoch_metrics(3, STATS, report, 1e-3, "fine_tune")
    assert row["val_accuracy"] == 0.5 and row["val_map"] == pytest.approx(report["map"])
    assert row["val_micro_f1"] == pytest.approx(report["micro_f1"], abs=1e-6)
    assert row["val_top5_accuracy"] is None
    single = epoch_metrics(3, STATS, {"top1_accuracy": 0.9, "loss": 0.3}, 1e-3, "fine_tune")
    assert "val_map" not in single and single["val_accuracy"] == 0.9
    assert evaluate(torch.empty(0, 2), torch.empty(0, 2), ["a", "b"], multilabel=True) == {}
    png = curves_png([{**row, "train_loss": 0.4}, {**row, "epoch": 4, "train_loss": 0.3}])
    assert png.startswith(b"\x89PNG")


def test_metadata_names_the_task_and_carries_one_threshold_per_class():
    config = JobSpec()
    single = build_metadata(config, ["a", "b"], {}, {})
    assert single["task"] == "single-label" and "thresholds" not in single
    multi = build_metadata(config, ["a", "b"], {}, {}, thresholds=[0.3, 0.55])
    assert multi["task"] == "multi-label" and multi["thresholds"] == [0.3, 0.55]
    with pytest.raises(ValueError, match="1 thresholds for 2 classes"):
        build_metadata(config, ["a", "b"], {}, {}, thresholds=[0.5])


def test_the_pairs_proxy_uploads_as_a_multi_label_manifest(tmp_path):
    proxy = build_pairs(0, n_pairs=60)
    upload = proxy.write_manifest_zip(tmp_path / "up.zip", square=True)
    report = ingest_bytes(upload.read_bytes(), tmp_path / "images.zip")
    index = report.index()
    assert index["task"] == "multi-label" and index["classes"] == proxy.classes
    by_source = {e["source"]: e for e in index["entries"]}
    for i in proxy.test_idx:
        entry = by_source[f"images/{int(i):05d}.png"]
        assert entry["split"] == "test"
        assert entry["labels"] == np.flatnonzero(proxy.labels[i]).tolist()
    assert sum(e["split"] == "test" for e in index["entries"]) == len(proxy.test_idx)
    square = pad_square(proxy.images[0])
    assert square.shape == (16, 16) and np.array_equal(square[4:12], proxy.images[0])
