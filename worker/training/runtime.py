"""Where a `fit` runs: device, mixed precision, data loader workers, seeding; and, inside a
torch.distributed process group (a rank started by `distributed.py`), which rank it is and
the few collectives that keep the ranks in step."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from core.backbones import BACKBONES
from worker.training.control import Interrupted

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    # Called inside the task, never at import: a forked worker must not inherit CUDA.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype_for(device: torch.device, backbone: str | None = None) -> torch.dtype | None:
    """The autocast dtype for training `backbone` on `device`: bf16 on a GPU that has it,
    else fp16 (with a GradScaler); None (full precision) on the CPU, and for a backbone
    whose `gpu_autocast` is off (`core.backbones`: slower under autocast)."""
    if device.type != "cuda":
        return None
    spec = BACKBONES.get(backbone) if backbone else None
    if spec is not None and not spec.gpu_autocast:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_num_workers() -> int:
    # On a small host the model needs every core; reading the uint8 cache is cheap.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    return 0 if cpus <= 4 else min(8, cpus // 2)


def _ignore_interrupts(_: int) -> None:
    # Ctrl-C in a terminal signals the whole foreground group, loader workers included; the
    # main process decides how the job stops (hand it back), the loaders must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


RANK_SEED_STRIDE = 1_000_003  # a prime: rank r's seeds never meet rank 0's nearby ones


def rank_seed(seed: int, rank: int) -> int:
    """Rank `rank`'s seed for its loader workers' augmentation. Every rank draws the same
    sample order (the sampler's generator), so the same seed would give rank r's i-th image
    the crop of rank 0's i-th image: correlated augmentation across the batch DDP averages.
    Loader workers only: without them a rank's main process augments from its
    `RankStream` (reseeding the process itself after the model is built made DDP's
    fine-tuning diverge: some random draws after it must agree between ranks)."""
    return (seed + RANK_SEED_STRIDE * rank) % 2**63


class RankStream:
    """Rank `rank`'s own stream of random draws, for the augmentation its main process does
    (the dataset's transforms without loader workers; the batch mixing): while `call` runs,
    the process's global stream is set aside and afterwards left where it was, so the draws
    the ranks must share stay in step while each rank crops, flips and mixes its images its
    own way. Seeded per epoch (`start`): a resumed epoch draws from that epoch's seed again."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.start(0, 0)

    def start(self, seed: int, epoch: int) -> None:
        high, low = np.random.SeedSequence([seed, epoch, self.rank]).generate_state(2)
        generator = torch.Generator().manual_seed((int(high) << 32 | int(low)) % 2**63)
        self.state = generator.get_state()  # a CPU generator's, as set_rng_state takes

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        outside = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            return fn(*args)
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outside)

    def wrap(self, fn: Callable[..., T]) -> Callable[..., T]:
        return lambda *args: self.call(fn, *args)


class RankAugmented(Dataset):  # type: ignore[type-arg]
    """`dataset` with its transforms drawing from `stream` (a rank without loader workers)."""

    def __init__(self, dataset: Dataset[Any], stream: RankStream) -> None:
        self.dataset, self.stream = dataset, stream

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.stream.call(self.dataset.__getitem__, index)


class _Interrupted:
    """What rank 0 broadcasts instead of a value when the caller stopped its computation."""


class _RankWorkerInit:
    """A loader worker of rank `rank`: interrupts ignored, and its seeds (the loader's base
    seed + worker id, as PyTorch sets them) moved to this rank's."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, worker_id: int) -> None:
        _ignore_interrupts(worker_id)
        seed_everything(rank_seed(torch.initial_seed(), self.rank))


@dataclass(frozen=True)
class Runtime:
    """The device, its autocast dtype (None: full precision), the loader settings, and this
    process's `rank` of `world_size` (1: a plain, single-process fit)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    loader_kwargs: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def parallel(self, model: nn.Module, find_unused: bool = False) -> nn.Module:
        """The model as the training steps run it: wrapped in DistributedDataParallel (its
        gradients averaged over the ranks; rank 0's weights broadcast at the wrap) when
        distributed, else itself. `find_unused`: some parameters are frozen (gradual)."""
        if not self.distributed:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=find_unused
        )

    def from_rank0(self, compute: Callable[[], T]) -> T:
        """`compute()` on rank 0 only, its value on every rank: what the ranks decide from
        (validation logits, the probe's features) is then the same everywhere."""
        if not self.distributed:
            return compute()
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = compute()
            except Interrupted:  # the caller's stop: every rank abandons the phase
                box[0] = _Interrupted()
        dist.broadcast_object_list(box, src=0, device=self._collective_device)
        if isinstance(box[0], _Interrupted):
            raise Interrupted("rank 0 stopped during its pass over the images")
        return box[0]  # type: ignore[no-any-return]

    def same_weights(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (in place): after the ranks each
        loaded a state of their own (a backoff to the best epoch), DDP would not re-sync."""
        if not self.distributed:
            return
        for tensor in module.state_dict().values():
            if self._collective_device.type == tensor.device.type:
                dist.broadcast(tensor, src=0)
            else:
                moved = tensor.to(self._collective_device)
                dist.broadcast(moved, src=0)
                tensor.copy_(moved)

    def agree(self, values: list[float], op: str = "max") -> list[float]:
        """Each value's max (or min) over the ranks: a stop any rank saw stops them all."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
        return [float(v) for v in t.tolist()]

    @property
    def _collective_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo CPU ones.
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @classmethod
    def on(
        cls, device: torch.device | None, num_workers: int | None, backbone: str | None = None
    ) -> Runtime:
        """Where and how `backbone` runs (its autocast: `amp_dtype_for`)."""
        device = device or pick_device()
        workers = default_num_workers() if num_workers is None or num_workers < 0 else num_workers
        loader_kwargs: dict[str, Any] = dict(
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0
        )
        rank, world = 0, 1
        if dist.is_available() and dist.is_initialized():  # one rank of distributed.py's
            rank, world = dist.get_rank(), dist.get_world_size()
        if workers > 0:
            init = _RankWorkerInit(rank) if world > 1 else _ignore_interrupts
            loader_kwargs["worker_init_fn"] = init
        return cls(device, amp_dtype_for(device, backbone), loader_kwargs, rank, world)

    def loader(self, dataset: Dataset[Any], batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, **{**self.loader_kwargs, **kwargs})
