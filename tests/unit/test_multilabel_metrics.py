"""Multi-label metrics on small cases checked by hand."""

import math

import numpy as np
import pytest
import torch

from worker.training.multilabel import (
    bce_loss,
    epoch_keys,
    multilabel_report,
    targets_matrix,
    tune_thresholds,
)


def logit(p):
    p = np.asarray(p, dtype=np.float64)
    return torch.tensor(np.log(p / (1 - p)), dtype=torch.float32)


# Four images, two classes. Class 0: positives scored 0.9 and 0.3 (a negative at 0.8 between
# them), AP = 1/2 * 1 + 1/2 * 2/3. Class 1: its one positive scored highest, AP = 1.
PROBS = np.array([[0.9, 0.2], [0.8, 0.7], [0.3, 0.6], [0.1, 0.4]])
TARGETS = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], dtype=np.float32)


def test_targets_matrix_is_multi_hot_float32():
    y = targets_matrix([[0, 2], [1], [0, 1, 2]], 3)
    assert y.dtype == np.float32
    assert y.tolist() == [[1, 0, 1], [0, 1, 0], [1, 1, 1]]
    assert targets_matrix([], 4).shape == (0, 4)


def test_targets_matrix_refuses_a_class_index_out_of_range():
    with pytest.raises(ValueError, match="class index 3 is outside 0..2"):
        targets_matrix([[0], [3]], 3)


def test_bce_loss_is_the_mean_binary_cross_entropy_with_weighted_positives():
    x, y = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    plain = math.log(2) + math.log(1 + math.e**2)
    assert float(bce_loss()(x, y)) == pytest.approx(plain / 2, rel=1e-6)
    weighted = 3 * math.log(2) + math.log(1 + math.e**2)  # positive of class 0 counts 3 times
    assert float(bce_loss([3.0, 1.0])(x, y)) == pytest.approx(weighted / 2, rel=1e-6)


def test_the_hand_checked_report():
    report = multilabel_report(logit(PROBS), torch.from_numpy(TARGETS), ["a", "b"])
    ap_a = 0.5 * 1 + 0.5 * 2 / 3
    assert report["map"] == pytest.approx((ap_a + 1) / 2)
    a, b = report["per_class"]
    assert a["ap"] == pytest.approx(ap_a) and b["ap"] == pytest.approx(1.0)
    # At 0.5: class a predicted for images 0, 1 (tp 1, fp 1, fn 1); b for 1, 2 (tp 1, fp 1).
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    assert (a["support"], b["support"]) == (2, 1) and a["threshold"] == 0.5
    assert report["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))  # 2tp/(2tp+fp+fn)
    assert report["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert report["subset_accuracy"] == pytest.approx(0.5)  # images 0 and 3 exactly right
    bce = -np.mean(TARGETS * np.log(PROBS) + (1 - TARGETS) * np.log(1 - PROBS))
    assert report["loss"] == pytest.approx(bce, rel=1e-5)
    assert report["thresholds"] == [0.5, 0.5] and report["num_samples"] == 4


def test_a_perfect_predictor_scores_one_everywhere():
    y = targets_matrix([[0], [1, 2], [0, 2], [1]], 3)
    report = multilabel_report(torch.from_numpy(y * 10 - 5), y, ["a", "b", "c"])
    assert report["map"] == 1.0 and report["micro_f1"] == 1.0 and report["macro_f1"] == 1.0
    assert report["subset_accuracy"] == 1.0 and report["loss"] < 0.01


def test_thresholds_sit_between_the_scores_that_maximize_each_class_f1():
    cuts = tune_thresholds(PROBS, TARGETS)
    # a: F1 is best (0.8) cutting at 0.3, halfway to the next score down (0.1) is 0.2;
    # b: its positive (0.7) alone above the cut, halfway to 0.6.
    assert cuts == pytest.approx([0.2, 0.65])
    report = multilabel_report(logit(PROBS), TARGETS, ["a", "b"], thresholds=cuts)
    assert [c["f1"] for c in report["per_class"]] == pytest.approx([0.8, 1.0])
    assert report["per_class"][1]["threshold"] == pytest.approx(0.65)


def test_a_class_without_positives_keeps_half_and_stays_out_of_the_averages():
    targets = np.array([[1, 0], [0, 0], [1, 0]], dtype=np.float32)
    probs = np.array([[0.9, 0.1], [0.2, 0.3], [0.7, 0.2]])
    assert tune_thresholds(probs, targets)[1] == 0.5
    report = multilabel_report(logit(probs), targets, ["a", "never"])
    assert report["per_class"][1]["ap"] is None and report["per_class"][1]["support"] == 0
    assert report["map"] == 1.0 and report["macro_f1"] == 1.0


def skewed(rng, n):
    """Rare classes whose positives a cautious model scores well under 0.5."""
    y = (rng.random((n, 4)) < [0.05, 0.1, 0.2, 0.4]).astype(np.float32)
    probs = 1 / (1 + np.exp(-(rng.normal(0, 0.7, y.shape) + 2.5 * y - 3.0)))
    return probs, y


def test_tuned_thresholds_beat_one_half_on_unseen_skewed_data():
    rng = np.random.default_rng(0)
    val, test = skewed(rng, 600), skewed(rng, 600)
    cuts = tune_thresholds(*val)
    assert (cuts < 0.5).all()
    names = list("abcd")
    default = multilabel_report(logit(test[0]), test[1], names)
    tuned = multilabel_report(logit(test[0]), test[1], names, thresholds=cuts)
    assert tuned["macro_f1"] > default["macro_f1"] + 0.2
    assert tuned["micro_f1"] > default["micro_f1"] + 0.2
    assert tuned["map"] == default["map"]  # ranking metrics ignore the thresholds


def test_epoch_keys_name_map_as_the_selection_metric():
    report = multilabel_report(logit(PROBS), TARGETS, ["a", "b"])
    assert epoch_keys(report) == {
        "val_loss": report["loss"],
        "val_map": report["map"],
        "val_micro_f1": report["micro_f1"],
        "val_macro_f1": report["macro_f1"],
    }


def test_mismatched_shapes_and_empty_splits():
    with pytest.raises(ValueError, match=r"must both be \(images, 3\)"):
        multilabel_report(torch.zeros(4, 2), np.zeros((4, 2)), ["a", "b", "c"])
    assert multilabel_report(torch.zeros(0, 2), np.zeros((0, 2)), ["a", "b"]) == {"num_samples": 0}
