"""How a search chooses between runs (`search.py`): by validation score, and between two
single-label runs on the same validation images only by a lead beyond chance (McNemar)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from core.jobspec import JobSpec
from worker.training.fit import FitResult
from worker.training.search_final import EpochClock

# Selection: a trial with a higher validation accuracy than the best so far replaces it only
# when, over the validation images the two classify differently, it is right on more of them
# by over SELECT_Z standard deviations of that difference under chance (McNemar's paired
# statistic: wins - losses > SELECT_Z * sqrt(wins + losses)). With 300 images one image is
# 0.3 points, and trials that fit the same data differ on tens of them.
SELECT_Z = 1.0


def value_of(result: FitResult) -> float | None:
    """The trial's validation score, its best epoch's (None when no epoch finished):
    accuracy, or for a multi-label run the metric it selects by (mAP)."""
    metric = result.extra.get("selection_metric", "val_accuracy")
    if metric == "val_loss":  # the study maximises: never the loss
        metric = "val_accuracy"
    value = result.best.get(metric)
    return None if value is None else float(value)


def better(value: float | None, than: float | None) -> bool:
    """Strictly better (ties go to the earlier trial); any value beats none."""
    return value is not None and (than is None or value > than)


def right_answers(result: FitResult) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(validation targets, which of them the delivered model got right, held out: a refitted
    probe's before its refit); None where a paired comparison does not apply (multi-label,
    no validation split)."""
    if result.held_out_logits is None or result.extra.get("task") == "multi-label":
        return None
    logits, targets = result.held_out_logits
    if logits.ndim != 2 or len(targets) == 0:
        return None
    return targets, logits.argmax(1) == targets


def replaces(value: float | None, result: FitResult, best: Best) -> tuple[bool, dict[str, Any]]:
    """Whether a trial replaces the best so far, and the paired comparison that decided it."""
    if not better(value, best.value):
        return False, {}
    if best.value is None:  # any value beats none
        return True, {}
    mine, theirs = right_answers(result), right_answers(best.result)
    if mine is None or theirs is None or not torch.equal(mine[0], theirs[0]):
        return True, {}  # not the same images: the higher value wins
    wins = int((mine[1] & ~theirs[1]).sum())
    losses = int((~mine[1] & theirs[1]).sum())
    replaced = wins - losses > SELECT_Z * (wins + losses) ** 0.5
    return replaced, {"trial": best.number, "wins": wins, "losses": losses}


@dataclass
class Best:
    number: int
    value: float | None
    result: FitResult
    spec: JobSpec
    clock: EpochClock | None = None  # its fit's measured times (None: no fine-tuning epoch)
