"""fit(config, data, callbacks) -> FitResult. Pure PyTorch: no Celery, no DB, no HTTP."""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from worker.training.backbones import create_model
from worker.training.callbacks import Callbacks
from worker.training.config import TrainConfig
from worker.training.data import PreparedData
from worker.training.loop import evaluate, train_one_epoch

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    model: nn.Module
    classes: list[str]
    history: list[dict[str, Any]]
    best: dict[str, Any]
    stopped: bool = False
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    # Called inside the task, never at import: a forked worker must not inherit CUDA.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def default_num_workers() -> int:
    # On a small host the model needs every core; loading from the uint8 cache is cheap.
    cpus = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    return 0 if cpus <= 4 else min(8, cpus // 2)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _is_better(metrics: dict[str, Any], best: dict[str, Any]) -> bool:
    if not best:
        return True
    acc, best_acc = metrics.get("val_accuracy"), best.get("val_accuracy")
    if acc is None or best_acc is None or math.isnan(acc):
        return metrics["train_loss"] < best["train_loss"]
    if acc != best_acc:
        return bool(acc > best_acc)
    return bool(metrics.get("val_loss", math.inf) < best.get("val_loss", math.inf))


def fit(
    config: TrainConfig,
    data: PreparedData,
    callbacks: Callbacks | None = None,
    *,
    device: torch.device | None = None,
    weights_dir: Path | None = None,
    num_workers: int | None = None,
    pretrained: bool = True,
) -> FitResult:
    callbacks = callbacks or Callbacks()
    device = device or pick_device()
    amp_dtype = amp_dtype_for(device)
    seed_everything(config.seed)

    model = create_model(config.backbone, len(data.classes), pretrained, weights_dir)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    workers = default_num_workers() if num_workers is None or num_workers < 0 else num_workers
    generator = torch.Generator().manual_seed(config.seed)
    loader_kwargs: dict[str, Any] = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    train_set = data.train_set(config)
    if len(train_set) == 0:
        raise ValueError("the training split is empty")
    train_loader = DataLoader(
        train_set,
        batch_size=min(config.batch_size, len(train_set)),
        shuffle=True,
        drop_last=len(train_set) > config.batch_size,  # no 1-image batch for BatchNorm
        generator=generator,
        **loader_kwargs,
    )
    val_loader = DataLoader(data.val_set(config), batch_size=config.batch_size * 2, **loader_kwargs)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    total_steps = config.epochs * len(train_loader)
    warmup = max(1, int(config.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    loss_fn = nn.CrossEntropyLoss()

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    best_state: dict[str, torch.Tensor] | None = None
    stopped = False
    callbacks.on_phase("training")
    for epoch in range(1, config.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(
            model, train_loader, optimizer, scheduler, loss_fn, device, epoch, callbacks, amp_dtype
        )
        if stats.stopped:
            stopped = True
            break
        val_loss, val_acc = evaluate(model, val_loader, loss_fn, device, amp_dtype)
        metrics = {
            "epoch": epoch,
            "train_loss": round(stats.loss, 6),
            "train_accuracy": round(stats.accuracy, 6),
            "val_loss": None if math.isnan(val_loss) else round(val_loss, 6),
            "val_accuracy": None if math.isnan(val_acc) else round(val_acc, 6),
            "learning_rate": lr,
            "images_per_second": round(stats.images_per_second, 2),
            "epoch_seconds": round(stats.seconds, 3),
        }
        history.append(metrics)
        if _is_better(metrics, best):
            best = dict(metrics)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        log.info("epoch %d/%d %s", epoch, config.epochs, metrics)
        callbacks.on_epoch_end(metrics, best)

    if best_state is not None:
        model.load_state_dict(best_state)
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return FitResult(
        model=model,
        classes=data.classes,
        history=history,
        best=best,
        stopped=stopped,
        device=str(device),
    )
