"""Classification metrics from logits: plain numpy, checked against scikit-learn in tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from worker.training.multilabel import multilabel_report


def confusion_matrix(targets: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (targets, preds), 1)
    return cm


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """Top-1 confidence vs accuracy, averaged over equal-width confidence bins."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_report(
    logits: torch.Tensor, targets: torch.Tensor, class_names: list[str]
) -> dict[str, Any]:
    """top-1, top-5, per-class precision/recall/F1, macro-F1, confusion matrix, ECE, loss."""
    n_classes = len(class_names)
    if len(targets) == 0:
        return {"num_samples": 0}
    logits = logits.float()
    y = targets.numpy().astype(np.int64)
    probs = logits.softmax(1).numpy()
    preds = probs.argmax(1)
    k = min(5, n_classes)
    topk = logits.topk(k, dim=1).indices.numpy()
    cm = confusion_matrix(y, preds, n_classes)
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(0).astype(float)
    actual = cm.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    loss = float(torch.nn.functional.cross_entropy(logits, targets))
    return {
        "num_samples": int(len(y)),
        "loss": loss,
        "top1_accuracy": float((preds == y).mean()),
        "top5_accuracy": float((topk == y[:, None]).any(1).mean()),  # top-k, k = min(5, C)
        "macro_f1": float(f1.mean()),
        "ece": expected_calibration_error(probs, y),
        "per_class": [
            {
                "class": name,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, name in enumerate(class_names)
        ],
        "confusion_matrix": cm.tolist(),
    }


def evaluate(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_names: list[str],
    multilabel: bool = False,
    thresholds: Any = None,
) -> dict[str, Any]:
    """The report of a split: `classification_report`, or for a multi-label run
    `multilabel.multilabel_report` (at `thresholds`, 0.5 when None) marked with its task.
    Empty when the split has no image."""
    if len(targets) == 0:
        return {}
    if not multilabel:
        return classification_report(logits, targets, class_names)
    return {"task": "multi-label", **multilabel_report(logits, targets, class_names, thresholds)}
