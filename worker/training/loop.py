"""One epoch of training, one pass of inference."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from worker.training.callbacks import Callbacks
from worker.training.control import Interrupted
from worker.training.multilabel import subset_correct


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    data_seconds: float
    stopped: bool = False
    steps: int = 0  # optimizer steps taken in this epoch (a resumed one included)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def loader_images_per_second(self) -> float:
        """How fast the input pipeline alone delivered (time spent waiting for batches)."""
        return self.images / self.data_seconds if self.data_seconds > 0 else float("inf")


class EpochSampler(Sampler[int]):
    """Each epoch a seeded permutation of the training set (or, with `weights`, a weighted
    draw with replacement), like RandomSampler / WeightedRandomSampler with a generator;
    and it can skip the first samples of the next epoch only, so that a job resumed from a
    mid-epoch checkpoint gets exactly the batches it had not trained on yet.

    One rank of `world_size` (distributed.py) takes DistributedSampler's share of that
    order: padded by repeating it to a multiple of `world_size`, then every
    `world_size`-th sample from `rank`. Every rank draws the same order (the same seeded
    generator), so the shares are disjoint (but for the padding) and equal: the ranks take
    the same number of steps, and each about 1/world_size of one process's."""

    def __init__(
        self,
        n: int,
        generator: torch.Generator,
        weights: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n, self.generator, self.weights = n, generator, weights
        self.rank, self.world_size = rank, world_size
        self.per_rank = math.ceil(n / world_size)
        self._skip = 0

    def skip_next(self, count: int) -> None:
        self._skip = max(0, min(count, self.per_rank))

    def __len__(self) -> int:
        return self.per_rank - self._skip

    def __iter__(self) -> Any:
        if self.weights is None:
            order = torch.randperm(self.n, generator=self.generator)
        else:
            order = torch.multinomial(self.weights, self.n, True, generator=self.generator)
        if self.world_size > 1:
            total = self.per_rank * self.world_size
            order = order.repeat(math.ceil(total / max(self.n, 1)))[:total]
            order = order[self.rank :: self.world_size]
        skip, self._skip = self._skip, 0
        yield from order[skip:].tolist()


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> Any:
    return torch.autocast(
        device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    )


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    device: torch.device,
    epoch: int,
    callbacks: Callbacks,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    mixing: Any = None,
    grad_clip_norm: float | None = None,
    freeze_norm_stats: bool = False,
    resume_from: EpochStats | None = None,
    after_step: Callable[[], None] | None = None,
    max_steps: int | Callable[[], int] | None = None,
) -> EpochStats:
    """One pass over `loader`: images through the whole network (fine-tuning), or cached
    features through the head alone (the linear probe). `resume_from`: what a mid-epoch
    checkpoint recorded of this epoch so far (its steps and sums); the loader then holds
    only the remaining batches. `max_steps`: the epoch ends after this many steps (a
    schedule's last, shorter epoch: `LrPlan.steps_in_epoch`); a callable is asked again
    after each step (a plan shortened during the epoch: `refit.WarmupRefit`). With multi-hot targets
    (multi-label) the accuracy counted is subset accuracy: images whose every class is
    right at probability 0.5."""
    model.train()
    if freeze_norm_stats:
        # Keep BatchNorm on its running statistics: the batch statistics of a small,
        # unusual dataset would shift every feature the probed head was fitted to.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    # Sums stay on the device: a .item() per step would force a sync on the GPU.
    done = resume_from or EpochStats(0.0, 0.0, 0, 0.0, 0.0)
    loss_sum = torch.full((), done.loss * done.images, device=device)
    correct = torch.full((), round(done.accuracy * done.images), device=device, dtype=torch.long)
    seen = done.images
    steps = done.steps + len(loader)  # progress counts the epoch's full length
    first_limit = max_steps() if callable(max_steps) else max_steps
    limit = steps if first_limit is None else min(steps, first_limit)
    start = time.perf_counter() - done.seconds
    data_seconds = done.data_seconds
    stopped = False
    step = done.steps
    fetch_start = time.perf_counter()
    batches = loader if limit == steps else itertools.islice(loader, max(0, limit - done.steps))
    for step, (images, targets) in enumerate(batches, start=done.steps + 1):
        data_seconds += time.perf_counter() - fetch_start
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        hard_targets = targets
        if mixing is not None:
            images, targets = mixing(images, targets)
        if images.ndim == 4:  # not for (N, C) features; every device (fit.py)
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip_norm:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
            optimizer.step()
        scheduler.step()
        if after_step is not None:  # e.g. the weights' moving average
            after_step()
        n = hard_targets.shape[0]
        loss_sum += loss.detach() * n
        if hard_targets.ndim == 2:  # multi-label: subset accuracy at 0.5
            correct += subset_correct(logits.detach(), hard_targets)
        else:
            correct += (logits.detach().argmax(1) == hard_targets).sum()
        seen += n
        callbacks.on_step(epoch, step, steps)
        if callbacks.should_stop():
            stopped = True
            break
        if callable(max_steps) and step >= max_steps():  # the plan ended this epoch early
            break
        fetch_start = time.perf_counter()
    seconds = time.perf_counter() - start
    return EpochStats(
        loss=float(loss_sum) / max(seen, 1),
        accuracy=float(correct) / max(seen, 1),
        images=seen,
        seconds=seconds,
        data_seconds=data_seconds,
        stopped=stopped,
        steps=step,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    features: bool = False,
    stop: Callable[[], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) for a whole loader, on the CPU; with `features`, the pooled
    pre-logits features instead of logits. `stop` is asked before each batch: True raises
    `Interrupted`."""
    model.eval()
    outputs, all_targets = [], []
    for images, targets in loader:
        if stop is not None and stop():
            raise Interrupted("stopped during a pass over the images")
        images = images.to(device, non_blocking=True)
        if images.ndim == 4:  # channels-last on every device, as training runs (fit.py)
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            if features:
                pooled = model.forward_features(images)  # type: ignore[operator]
                out = model.forward_head(pooled, pre_logits=True)  # type: ignore[operator]
            else:
                out = model(images)
        outputs.append(out.float().cpu())
        all_targets.append(targets)
    if not outputs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(outputs), torch.cat(all_targets)
