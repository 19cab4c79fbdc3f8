"""The record of a run's epochs: their metrics, the best epoch so far (by the selection
metric, with its weights) and early stopping."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from core.jobspec import JobSpec
from worker.training.callbacks import Callbacks
from worker.training.loop import EpochStats
from worker.training.multilabel import epoch_keys

MAXIMIZE = {
    "val_accuracy": True,
    "val_macro_f1": True,
    "val_loss": False,
    "val_map": True,  # multi-label: mean average precision, threshold-free
    "val_micro_f1": True,
}


def selection_metric(config: JobSpec, multilabel: bool = False) -> str:
    """The metric the best epoch is chosen by: the user's `early_stopping.metric`, else
    val_accuracy. A multi-label run selects by val_map instead of val_accuracy: its
    val_accuracy is subset accuracy at 0.5, coarse and blind to how the classes rank
    (the thresholds are tuned after training)."""
    es = config.early_stopping
    metric = es.metric if es else "val_accuracy"
    return "val_map" if multilabel and metric == "val_accuracy" else metric


class BestEpoch:
    """Tracks the best epoch by the selection metric and keeps its weights."""

    def __init__(self, metric: str):
        self.metric = metric
        self.maximize = MAXIMIZE[metric]
        self.metrics: dict[str, Any] = {}
        self.state: dict[str, torch.Tensor] | None = None
        self.stale_epochs = 0

    def _score(self, metrics: dict[str, Any]) -> float:
        value = metrics.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            # No validation split: the training loss is all there is to go by.
            value = -metrics["train_loss"] if self.maximize else metrics["train_loss"]
        return float(value) if self.maximize else -float(value)

    def _tie_break(self, metrics: dict[str, Any]) -> float:
        """The validation loss, lower is better: what decides between epochs whose selection
        metric is equal, as it often is on a small validation set (50 images: 2 points an
        image), where the first of them would otherwise win by default."""
        value = metrics.get("val_loss")
        if self.metric == "val_loss" or value is None or math.isnan(value):
            return math.inf
        return float(value)

    def update(self, metrics: dict[str, Any], model: nn.Module, min_delta: float = 0.0) -> bool:
        score, best = (self._score(metrics), self._score(self.metrics)) if self.metrics else (0, 0)
        better = (
            not self.metrics
            or score > best + min_delta
            or (
                min_delta == 0
                and score == best
                and self._tie_break(metrics) < self._tie_break(self.metrics)
            )
        )
        if better:
            self.metrics = dict(metrics)
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.stale_epochs = 0
        else:
            self.stale_epochs += 1
        return better


class EpochRecord:
    """Every epoch's metrics in order, the best epoch, and the caller told of each."""

    def __init__(self, config: JobSpec, callbacks: Callbacks, multilabel: bool = False):
        self.config = config
        self.best = BestEpoch(selection_metric(config, multilabel))
        self.history: list[dict[str, Any]] = []
        self.callbacks = callbacks

    def add(self, metrics: dict[str, Any], model: nn.Module, min_delta: float = 0.0) -> None:
        self.history.append(metrics)
        self.best.update(metrics, model, min_delta)
        self.callbacks.on_epoch_end(metrics, self.best.metrics)

    def early_stop(self) -> bool:
        """No better epoch for `patience` epochs in a row."""
        es = self.config.early_stopping
        return es is not None and self.best.stale_epochs >= es.patience

    def restore(self, state: dict[str, Any]) -> None:
        """Pick up the history and best epoch a checkpoint recorded."""
        self.history.extend(state["history"])
        self.best.metrics, self.best.state = dict(state["best_metrics"]), state["best_state"]
        self.best.stale_epochs = int(state["stale_epochs"])

    def snapshot(self) -> dict[str, Any]:
        """What a checkpoint keeps of the record."""
        return {
            "best_metrics": dict(self.best.metrics),
            "best_state": self.best.state,
            "stale_epochs": self.best.stale_epochs,
            "history": [dict(h) for h in self.history],
        }


def epoch_metrics(
    epoch: int, stats: EpochStats, report: dict[str, Any], lr: float, phase: str
) -> dict[str, Any]:
    """One epoch's row of the history (what the job's metrics and curves show)."""

    def r(x: float | None) -> float | None:
        return None if x is None or math.isnan(x) else round(float(x), 6)

    multilabel = report.get("task") == "multi-label"
    row = {
        "epoch": epoch,
        "phase": phase,
        "train_loss": round(stats.loss, 6),
        "train_accuracy": round(stats.accuracy, 6),
        "val_loss": r(report.get("loss")),
        # Multi-label: subset accuracy (every class right at 0.5), so readers of
        # val_accuracy still get an accuracy; val_map is what selects.
        "val_accuracy": r(report.get("subset_accuracy" if multilabel else "top1_accuracy")),
        "val_top5_accuracy": r(report.get("top5_accuracy")),
        "val_macro_f1": r(report.get("macro_f1")),
    }
    if multilabel:
        row.update({k: r(v) for k, v in epoch_keys(report).items()})
    return {
        **row,
        "learning_rate": lr,
        "images_per_second": round(stats.images_per_second, 2),
        "loader_images_per_second": round(min(stats.loader_images_per_second, 1e9), 2),
        "epoch_seconds": round(stats.seconds, 3),
    }
