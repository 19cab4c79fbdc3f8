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
MAX_POS_WEIGHT = 50.0  # a class with 1 positive in 1000 images is not weighed 999 times

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


class SmoothedBCE(nn.BCEWithLogitsLoss):
    """BCE with logits against smoothed multi-hot targets: y * (1 - eps) + eps / 2, the
    binary form of label smoothing (every class its own two-way softmax)."""

    def __init__(self, eps: float, pos_weight: torch.Tensor | None = None):
        super().__init__(pos_weight=pos_weight)
        self.eps = eps

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, targets * (1.0 - self.eps) + self.eps / 2)


def bce_loss(
    pos_weight: Array | Sequence[float] | None = None, label_smoothing: float = 0.0
) -> nn.Module:
    """Binary cross-entropy on logits, one independent sigmoid per class; `pos_weight`
    (one value per class) weighs each class's positives, e.g. negatives/positives;
    `label_smoothing` eps moves every target eps/2 towards one half."""
    weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
    if label_smoothing > 0:
        return SmoothedBCE(label_smoothing, weight)
    return nn.BCEWithLogitsLoss(pos_weight=weight)


def positive_counts(targets: np.ndarray) -> np.ndarray:
    """Images carrying each class (multi-hot targets: images x classes)."""
    return (np.asarray(targets) > 0.5).sum(0).astype(np.float64)


def pos_weights(targets: np.ndarray, clip: float = MAX_POS_WEIGHT) -> np.ndarray:
    """Per class, negatives / positives among `targets`, clipped to [1/clip, clip]: a rare
    class's few positives weigh as much as its many negatives. A class with no positive
    here gets 1 (nothing to weigh)."""
    pos = positive_counts(targets)
    neg = len(targets) - pos
    ratio = np.divide(neg, pos, out=np.ones_like(pos), where=pos > 0)
    return np.clip(ratio, 1.0 / clip, clip).astype(np.float32)


def sample_weights(targets: np.ndarray) -> np.ndarray:
    """For a class-balanced sampler: each image weighs 1 / (images of its rarest class), so
    images that carry a rare class are drawn about as often as those of a common one. An
    image with no class weighs as one of the commonest class."""
    y = np.asarray(targets) > 0.5
    pos = positive_counts(targets)
    inverse = np.where(pos > 0, 1.0 / np.maximum(pos, 1.0), 0.0)
    weights = (y * inverse).max(1)
    fallback = 1.0 / max(float(pos.max()), 1.0) if len(pos) else 1.0
    return np.where(weights > 0, weights, fallback)


def subset_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many images have every class right at probability 0.5 (logit 0): the training
    accuracy a multi-label epoch reports (subset accuracy, as `val_accuracy`)."""
    return ((logits >= 0) == (targets > 0.5)).all(1).sum()


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
