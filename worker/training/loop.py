"""One epoch of training, one pass of evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from worker.training.callbacks import Callbacks


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    stopped: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


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
) -> EpochStats:
    model.train()
    # Sums stay on the device: a .item() per step would force a sync on the GPU.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    steps = len(loader)
    start = time.perf_counter()
    stopped = False
    for step, (images, targets) in enumerate(loader, start=1):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model(images)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        n = targets.shape[0]
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(1) == targets).sum()
        seen += n
        callbacks.on_step(epoch, step, steps)
        if callbacks.should_stop():
            stopped = True
            break
    seconds = time.perf_counter() - start
    return EpochStats(
        loss=float(loss_sum) / max(seen, 1),
        accuracy=float(correct) / max(seen, 1),
        images=seen,
        seconds=seconds,
        stopped=stopped,
    )


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) for a whole loader, on the CPU."""
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = model(images)
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
    return torch.cat(all_logits), torch.cat(all_targets)


def evaluate(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, float]:
    """(mean loss, top-1 accuracy)."""
    logits, targets = predict(model, loader, device, amp_dtype)
    if len(targets) == 0:
        return float("nan"), float("nan")
    loss = float(loss_fn(logits, targets))
    accuracy = float((logits.argmax(1) == targets).float().mean())
    return loss, accuracy
