"""Which epoch is kept: the selection metric, and the validation loss between equals."""

from __future__ import annotations

import math

import torch
from torch import nn

from worker.training.selection import BestEpoch


def offer(best: BestEpoch, epoch: int, accuracy: float, loss: float, min_delta: float = 0.0):
    model = nn.Linear(1, 1)
    nn.init.constant_(model.weight, float(epoch))
    metrics = {"epoch": epoch, "val_accuracy": accuracy, "val_loss": loss, "train_loss": 1.0}
    return best.update(metrics, model, min_delta)


def kept(best: BestEpoch) -> int:
    assert best.state is not None
    assert float(best.state["weight"]) == best.metrics["epoch"]  # the weights go with it
    return int(best.metrics["epoch"])


def test_equal_accuracy_is_decided_by_the_lower_validation_loss():
    best = BestEpoch("val_accuracy")
    assert offer(best, 0, 0.64, 1.50)
    assert offer(best, 1, 0.64, 1.40)  # as accurate, surer of the right answers
    assert not offer(best, 2, 0.64, 1.45)
    assert kept(best) == 1 and best.stale_epochs == 1
    assert not offer(best, 3, 0.62, 0.90)  # accuracy first: a lower loss alone is not enough
    assert offer(best, 4, 0.66, 2.00)
    assert kept(best) == 4


def test_no_tie_break_with_a_min_delta_or_without_a_validation_loss():
    best = BestEpoch("val_accuracy")
    offer(best, 0, 0.64, 1.50, min_delta=0.01)
    assert not offer(best, 1, 0.64, 1.00, min_delta=0.01)  # early stopping's bar is the metric
    best = BestEpoch("val_accuracy")
    offer(best, 0, 0.64, math.nan)
    assert not offer(best, 1, 0.64, math.nan)
    assert kept(best) == 0


def test_selecting_by_validation_loss_needs_no_tie_break():
    best = BestEpoch("val_loss")
    offer(best, 0, 0.50, 1.0)
    assert offer(best, 1, 0.40, 0.9)
    assert not offer(best, 2, 0.90, 0.9)
    assert kept(best) == 1
    assert isinstance(best.state["weight"], torch.Tensor)  # type: ignore[index]
