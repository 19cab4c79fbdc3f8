"""Optimizers, parameter groups, learning-rate plans and freezing: the knobs of `fit`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from core.jobspec import JobSpec


class LrPlan:
    """Per-step LR factor. Re-plannable: under a time budget the schedule is re-fitted to
    the epochs that fit, so the cosine decay still completes."""

    def __init__(self, schedule: str, steps_per_epoch: int, epochs: int, warmup_steps: int):
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = warmup_steps
        self.scale = 1.0  # lowered by `fine_tune` when an epoch regresses (backoff)
        # Where the cosine goes on from after a re-fit past the warm-up (`refit`): the step
        # and the share of the decay done there. Saved with the scheduler's state.
        self.anchor_step = warmup_steps
        self.anchor_progress = 0.0
        self.replan(epochs)

    def refit(self, step: int, epochs: float) -> None:
        """Re-plan `epochs` epochs at optimizer step `step`. Past the warm-up the cosine
        goes on from where it is over the steps left: the learning rate at `step` stays
        what it was, and decays more slowly from there (a longer plan) or faster (a
        shorter one), instead of jumping up or down with the decay's share."""
        if self.schedule == "cosine" and step > self.warmup_steps:
            self.anchor_progress = self.decayed(step)
            self.anchor_step = step
        self.replan(epochs)

    def replan(self, epochs: float) -> None:
        """Plan `epochs` epochs; a fraction (a time budget's re-fit) makes the last epoch
        shorter: it runs that share of its steps (`steps_in_epoch`)."""
        self.total_steps = max(1, round(self.steps_per_epoch * epochs))
        # Counted from the steps: a fraction too small for one step adds no epoch.
        self.epochs = max(1, math.ceil(self.total_steps / max(1, self.steps_per_epoch)))
        self.step_every = max(1, self.epochs // 3) * self.steps_per_epoch

    @property
    def planned_epochs(self) -> float:
        """The epochs planned, with the last one's fraction."""
        return self.total_steps / max(1, self.steps_per_epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps epoch `epoch` (from 1) takes: all of them but in a last, shorter one."""
        done = (epoch - 1) * self.steps_per_epoch
        return max(0, min(self.steps_per_epoch, self.total_steps - done))

    def __call__(self, step: int) -> float:
        return self.scale * self._shape(step)

    def _shape(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "step":
            return float(0.1 ** (step // self.step_every))
        if step < self.warmup_steps:  # cosine with linear warmup
            # Quadratic from zero: the first steps after the probe move the pretrained
            # weights very little (a linear ramp already lost what the probe had learned).
            return ((step + 1) / self.warmup_steps) ** 2
        return 0.5 * (1.0 + math.cos(math.pi * self._progress(step)))

    def decayed(self, step: int) -> float:
        """The share of the cosine's decay done at `step` (0 until the warm-up ends)."""
        return 0.0 if step <= self.warmup_steps else self._progress(step)

    def _progress(self, step: int) -> float:
        """The share of the cosine's decay done at `step` (past the warm-up)."""
        done, left = self.anchor_progress, 1.0 - self.anchor_progress
        span = max(1, self.total_steps - self.anchor_step)
        return min(1.0, done + left * max(0, step - self.anchor_step) / span)


def class_weights(
    config: JobSpec, labels: np.ndarray, n_classes: int
) -> tuple[str, torch.Tensor | None]:
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    ratio = counts.max() / max(counts.min(), 1.0)
    mode = config.class_balance
    if mode == "auto":
        mode = "weighted_loss" if ratio > config.imbalance_threshold else "none"
    if mode == "weighted_loss":
        w = counts.sum() / (n_classes * np.maximum(counts, 1.0))
        return mode, torch.tensor(w, dtype=torch.float32)
    return mode, None


def param_groups(
    model: nn.Module, lr: float, backbone_mult: float, wd: float
) -> list[dict[str, Any]]:
    head_ids = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]
    head = [p for p in model.parameters() if id(p) in head_ids]
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    # No weight decay on norms and biases (1-d tensors).
    groups = [
        {
            "params": [p for p in backbone if p.ndim > 1],
            "lr": lr * backbone_mult,
            "weight_decay": wd,
        },
        {
            "params": [p for p in backbone if p.ndim <= 1],
            "lr": lr * backbone_mult,
            "weight_decay": 0.0,
        },
        {"params": [p for p in head if p.ndim > 1], "lr": lr, "weight_decay": wd},
        {"params": [p for p in head if p.ndim <= 1], "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def layer_decayed_groups(
    model: nn.Module, lr: float, backbone_mult: float, wd: float, layer_decay: float
) -> list[dict[str, Any]]:
    """timm's layer-wise decay groups: the head at `lr`, each block below it at
    `layer_decay` times the one above, the backbone's top block at `lr x backbone_mult`."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(model, weight_decay=wd, layer_decay=layer_decay)
    head_ids = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]
    for g in groups:
        is_head = all(id(p) in head_ids for p in g["params"])
        g["lr"] = lr * g.pop("lr_scale", 1.0) * (1.0 if is_head else backbone_mult)
    return [g for g in groups if g["params"]]


def make_optimizer(config: JobSpec, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def make_scheduler(
    config: JobSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, steps_per_epoch * epochs)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total + 1
        )
    warmup = max(1, int(config.warmup_epochs * steps_per_epoch))
    plan = LrPlan(config.schedule, steps_per_epoch, epochs, warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, plan)


def backbone_stages(model: nn.Module) -> list[list[nn.Parameter]]:
    """Backbone parameters grouped bottom (stem) to top, head excluded."""
    from timm.models import group_parameters

    head_ids = {id(p) for p in model.get_classifier().parameters()}  # type: ignore[operator]
    named = dict(model.named_parameters())
    grouped = group_parameters(model, model.group_matcher(coarse=True))  # type: ignore[operator]
    stages = []
    for key in sorted(grouped):
        params = [named[n] for n in grouped[key] if id(named[n]) not in head_ids]
        if params:
            stages.append(params)
    return stages


def set_trainable(params: list[nn.Parameter], flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)
