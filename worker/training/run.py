"""What the phases of one `fit` share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from core.jobspec import JobSpec
from worker.training.checkpoint import build_checkpoint
from worker.training.control import Control
from worker.training.data import PreparedData
from worker.training.runtime import Runtime
from worker.training.selection import EpochRecord


@dataclass
class Run:
    """The model being trained, the spec and data it trains on, where it runs (`runtime`),
    how progress flows out and when to stop (`control`), the record of its epochs, and
    `extra`: facts about the run reported with the result (class balance, probe, resume)."""

    config: JobSpec
    data: PreparedData
    model: nn.Module
    runtime: Runtime
    loss_fn: nn.Module
    control: Control
    record: EpochRecord
    extra: dict[str, Any] = field(default_factory=dict)
    # The probe's cached features and chosen penalty, for a refit on train + validation
    # when the probe is the model delivered (`probe.refit_probe`).
    probe_cache: Any = None
    # The delivered model's (validation logits, targets), from the final report: the top
    # losses (`label_issues.py`) reuse them instead of another pass.
    val_outputs: Any = None
    # The probe's held-out (validation logits, targets), before any refit on train +
    # validation: what a search compares a delivered probe by (`search_select.right_answers`).
    probe_val_outputs: Any = None

    def checkpoint(self, phase: str, epoch: int, **training: Any) -> None:
        """Hand the callbacks a resumable snapshot (CPU tensors, plain containers)."""
        if not self.control.keeps_checkpoints:
            return
        self.control.on_checkpoint(
            build_checkpoint(
                self.config,
                self.data.classes,
                self.model,
                self.record.snapshot(),
                self.extra,
                phase,
                epoch,
                training,
            )
        )
