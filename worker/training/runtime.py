"""Where a `fit` runs: device, mixed precision, data loader workers, seeding."""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


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
    # On a small host the model needs every core; reading the uint8 cache is cheap.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    return 0 if cpus <= 4 else min(8, cpus // 2)


def _ignore_interrupts(_: int) -> None:
    # Ctrl-C in a terminal signals the whole foreground group, loader workers included; the
    # main process decides how the job stops (hand it back), the loaders must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass(frozen=True)
class Runtime:
    """The device, its autocast dtype (None: full precision) and the loader settings."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    loader_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def on(cls, device: torch.device | None, num_workers: int | None) -> Runtime:
        device = device or pick_device()
        workers = default_num_workers() if num_workers is None or num_workers < 0 else num_workers
        loader_kwargs: dict[str, Any] = dict(
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0
        )
        if workers > 0:
            loader_kwargs["worker_init_fn"] = _ignore_interrupts
        return cls(device, amp_dtype_for(device), loader_kwargs)

    def loader(self, dataset: Dataset[Any], batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, **{**self.loader_kwargs, **kwargs})
