"""Rank 0 of a distributed fit hands its progress to the parent through an events file:
every hook arrives, in order (the parent's `Relay`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from worker.training.callbacks import Callbacks
from worker.training.distributed import RankZeroCallbacks, Relay


class Heard(Callbacks):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_phase(self, phase: str) -> None:
        self.events.append(("phase", phase))

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.events.append(("step", (epoch, step, steps_per_epoch)))

    def on_plan(self, epochs: float) -> None:
        self.events.append(("plan", epochs))

    def on_epoch_end(self, metrics: dict[str, Any], best: dict[str, Any]) -> None:
        self.events.append(("epoch_end", metrics["epoch"]))


def test_rank_zeros_hooks_reach_the_parent_in_order_a_re_fitted_plan_included(tmp_path: Path):
    rank0 = RankZeroCallbacks(tmp_path, os.getppid())
    heard = Heard()
    relay = Relay(tmp_path, heard)
    rank0.on_phase("training")
    rank0.on_step(1, 3, 3)
    rank0.on_epoch_end({"epoch": 1}, {"epoch": 1})
    rank0.on_plan(12)
    relay.forward()
    rank0.on_step(2, 1, 3)
    relay.forward()
    relay.forward()  # nothing new: nothing twice
    assert heard.events == [
        ("phase", "training"),
        ("step", (1, 3, 3)),
        ("epoch_end", 1),
        ("plan", 12),
        ("step", (2, 1, 3)),
    ]
