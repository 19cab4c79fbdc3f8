"""Multi-label classification, the pure parts: multi-hot targets, the BCE loss, per-class
thresholds tuned on validation scores, and the report (mAP, per-class AP, micro/macro F1).

A multi-label dataset's index has `"task": "multi-label"` and each entry a `labels` list of
class indices; the model scores every class independently (a sigmoid per logit) and an image
has a class when its probability reaches that class's threshold (`probs >= threshold`).
No database, no HTTP: torch, numpy and scikit-learn only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_recall_fscore_support,
)
from torch import nn

DEFAULT_THRESHOLD = 0.5  # a class with no positive to tune on keeps it

Array = np.ndarray | torch.Tensor


def targets_matrix(labels_lists: Sequence[Sequence[int]], n_classes: int) -> np.ndarray:
    """Multi-hot float32 targets (images x classes) from each image's class indices."""
    lengths = np.fromiter((len(labels) for labels in labels_lists), dtype=np.int64)
    cols = np.fromiter(
        (int(c) for labels in labels_lists for c in labels), dtype=np.int64, count=lengths.sum()
    )
    if cols.size and (cols.min() < 0 or cols.max() >= n_classes):
        bad = cols[(cols < 0) | (cols >= n_classes)][0]
        raise ValueError(f"class index {bad} is outside 0..{n_classes - 1}")
    out = np.zeros((len(lengths), n_classes), dtype=np.float32)
    out[np.repeat(np.arange(len(lengths)), lengths), cols] = 1.0
    return out


def bce_loss(pos_weight: Array | Sequence[float] | None = None) -> nn.Module:
    """Binary cross-entropy on logits, one independent sigmoid per class; `pos_weight`
    (one value per class) weighs each class's positives, e.g. negatives/positives."""
    weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
    return nn.BCEWithLogitsLoss(pos_weight=weight)


def _numpy(values: Array | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def tune_thresholds(probs: Array, targets: Array) -> np.ndarray:
    """Per class, the probability threshold that maximizes that class's F1 on these
    (validation) scores; DEFAULT_THRESHOLD for a class with no positive among them.

    The best cut lies between two neighbouring distinct scores; it is placed halfway, so a
    test score equal to a validation score is not decided by rounding."""
    p, y = _numpy(probs), _numpy(targets) > 0.5
    thresholds = np.full(p.shape[1], DEFAULT_THRESHOLD, dtype=np.float32)
    for c in range(p.shape[1]):
        if not y[:, c].any():
            continue
        precision, recall, cuts = precision_recall_curve(y[:, c], p[:, c], drop_intermediate=False)
        # precision[i], recall[i]: predicting positive when score >= cuts[i] (cuts ascending).
        denom = precision[:-1] + recall[:-1]
        f1 = np.divide(
            2 * precision[:-1] * recall[:-1], denom, out=np.zeros_like(denom), where=denom > 0
        )
        best = int(np.argmax(f1))  # ties: the lowest cut, the one with the higher recall
        below = cuts[best - 1] if best > 0 else 0.0
        thresholds[c] = (cuts[best] + below) / 2
    return thresholds


def multilabel_report(
    logits: Array,
    targets: Array,
    classes: list[str],
    thresholds: Array | Sequence[float] | None = None,
) -> dict[str, Any]:
    """Loss (BCE), mAP, per-class AP/F1/precision/recall, micro/macro F1 and subset accuracy
    of `logits` (images x classes) against multi-hot `targets`, each class predicted when its
    probability reaches its threshold (DEFAULT_THRESHOLD for all when none are given).

    mAP and macro F1 average over the classes with at least one positive here: a class
    absent from the split has no AP, and counting it as 0 (or 1) would only add noise.
    `map` is None when no class has a positive."""
    n_classes = len(classes)
    x = torch.from_numpy(_numpy(logits))
    y = _numpy(targets)
    if x.ndim != 2 or x.shape[1] != n_classes or y.shape != tuple(x.shape):
        raise ValueError(
            f"logits {tuple(x.shape)} and targets {y.shape} must both be (images, {n_classes})"
        )
    if len(y) == 0:
        return {"num_samples": 0}
    cuts = (
        np.full(n_classes, DEFAULT_THRESHOLD, dtype=np.float32)
        if thresholds is None
        else _numpy(thresholds).reshape(n_classes)
    )
    loss = float(nn.functional.binary_cross_entropy_with_logits(x, torch.from_numpy(y)))
    probs = torch.sigmoid(x).numpy()
    truth = (y > 0.5).astype(np.int64)
    preds = (probs >= cuts).astype(np.int64)
    support = truth.sum(0)
    present = support > 0
    ap = [
        float(average_precision_score(truth[:, c], probs[:, c])) if present[c] else None
        for c in range(n_classes)
    ]
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, preds, average=None, labels=list(range(n_classes)), zero_division=0
    )
    scored = [a for a in ap if a is not None]
    return {
        "num_samples": int(len(y)),
        "loss": loss,
        "map": float(np.mean(scored)) if scored else None,
        "micro_f1": float(f1_score(truth, preds, average="micro", zero_division=0)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "subset_accuracy": float(accuracy_score(truth, preds)),  # every class right
        "thresholds": [float(t) for t in cuts],
        "per_class": [
            {
                "class": name,
                "ap": ap[c],
                "f1": float(f1[c]),
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "support": int(support[c]),
                "threshold": float(cuts[c]),
            }
            for c, name in enumerate(classes)
        ],
    }


def epoch_keys(report: dict[str, Any]) -> dict[str, Any]:
    """An epoch's validation metrics from `multilabel_report`; `val_map` is the one a
    multi-label run selects its best epoch by (higher is better)."""
    return {
        "val_loss": report.get("loss"),
        "val_map": report.get("map"),
        "val_micro_f1": report.get("micro_f1"),
        "val_macro_f1": report.get("macro_f1"),
    }
