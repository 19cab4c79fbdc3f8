"""Our metrics against scikit-learn on known predictions."""

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from worker.training.metrics import classification_report, expected_calibration_error


@pytest.fixture(scope="module")
def predictions():
    rng = np.random.default_rng(0)
    n, c = 500, 7
    targets = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) * 2
    logits[np.arange(n), targets] += rng.normal(1.0, 1.5, n)  # better than chance, imperfect
    return (
        torch.tensor(logits, dtype=torch.float32),
        torch.tensor(targets),
        [f"c{i}" for i in range(c)],
    )


def test_report_matches_scikit_learn(predictions):
    logits, targets, names = predictions
    report = classification_report(logits, targets, names)
    y, p = targets.numpy(), logits.argmax(1).numpy()
    assert report["top1_accuracy"] == pytest.approx(skm.accuracy_score(y, p))
    assert report["top5_accuracy"] == pytest.approx(
        skm.top_k_accuracy_score(y, logits.numpy(), k=5, labels=range(7))
    )
    assert report["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, p, labels=range(7))
    for i, row in enumerate(report["per_class"]):
        assert row["precision"] == pytest.approx(precision[i])
        assert row["recall"] == pytest.approx(recall[i])
        assert row["f1"] == pytest.approx(f1[i])
        assert row["support"] == support[i]
    assert report["confusion_matrix"] == skm.confusion_matrix(y, p, labels=range(7)).tolist()
    assert report["loss"] == pytest.approx(
        skm.log_loss(y, logits.softmax(1).numpy(), labels=range(7)), rel=1e-4
    )


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    targets = np.array([0, 1, 0, 1])
    # bins of width 1/15: 0.9 alone (right), 0.8 alone (wrong), 0.6 and 0.7 alone (right)
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.6) + abs(1 - 0.7)) / 4
    assert expected_calibration_error(probs, targets) == pytest.approx(expected)


def test_perfectly_confident_and_right_is_calibrated():
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert expected_calibration_error(probs, np.array([0, 1, 2, 1])) == pytest.approx(0.0)


def test_classes_never_predicted_get_zero_precision_not_nan():
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0]])
    report = classification_report(logits, torch.tensor([0, 2, 1]), ["a", "b", "c"])
    assert report["per_class"][2] == {
        "class": "c",
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
    }
