"""Pictures where they beat a table: training curves and the confusion matrix, as PNG
(a multi-label run has no confusion matrix: an image may carry several classes)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def curves_png(history: list[dict[str, Any]], title: str = "") -> bytes:
    """Loss (left) and accuracy (right) per epoch, train and validation; a multi-label run's
    validation mAP (what selects its best epoch) beside its subset accuracies."""
    fig = _figure(10, 3.8)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    multilabel = any(h.get("val_map") is not None for h in history)
    acc = "subset accuracy" if multilabel else "accuracy"
    for key, label, ax in (
        ("train_loss", "train", ax_loss),
        ("val_loss", "validation", ax_loss),
        ("train_accuracy", "train", ax_acc),
        ("val_accuracy", "validation", ax_acc),
        *((("val_map", "validation mAP", ax_acc),) if multilabel else ()),
    ):
        values = [h.get(key) for h in history]
        points = [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    title = f"{acc} and mAP" if multilabel else acc
    ax_acc.set(xlabel="epoch", ylabel=acc, title=title, ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _png(fig)


def confusion_matrix_png(matrix: list[list[int]], class_names: list[str], title: str = "") -> bytes:
    cm = np.asarray(matrix)
    n = len(class_names)
    size = min(16.0, 2.5 + 0.45 * n)
    fig = _figure(size, size)
    ax = fig.subplots()
    row_sums = cm.sum(1, keepdims=True)
    normalized = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)
    ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=90 if n > 8 else 0)
    ax.set_yticks(range(n), labels=class_names)
    # Class names are the user's text, never markup: `$\undefined$` would otherwise be parsed
    # as mathtext and fail the whole job after training.
    for label in (*ax.get_xticklabels(), *ax.get_yticklabels()):
        label.set_parse_math(False)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix (row-normalized)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    color = "white" if normalized[i, j] > 0.5 else "black"
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    return _png(fig)
