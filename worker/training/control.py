"""When training stops: the caller's stop request and the time budget."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from worker.training.callbacks import Callbacks

# A schedule's last epoch is cut to the part of one that fits (`epochs_within_budget`),
# never to less than this: each epoch pays a validation pass in full.
MIN_LAST_EPOCH = 0.25


class Interrupted(Exception):
    """The caller asked to stop during a phase with no steps to stop between (the probe's
    feature extraction): the phase is abandoned, and `fit` ends with reason "callback"."""


class Control(Callbacks):
    """The caller's callbacks plus the time budget. `reason` says why training ended early:
    "callback" (the caller asked), "time_budget" or "early_stopping" (set by the phase that
    stops)."""

    def __init__(self, inner: Callbacks, budget: float | None, deadline: float | None = None):
        self.inner = inner
        self.delivers_model = inner.delivers_model  # a time budget keeps time for delivery
        # `deadline` (time.monotonic) when the caller counts the budget from earlier (the
        # job's start: the budget covers its whole running time); else from now.
        if deadline is None and budget:
            deadline = time.monotonic() + budget
        self.deadline = deadline
        # Seconds kept back at the end for what runs after training (final evaluation,
        # export): `epochs_within_budget` plans epochs only up to `deadline - reserve`.
        self.reserve = 0.0
        # Seconds before the deadline at which a training step ends training (the reserve
        # and the stopped epoch's validation: `refit.keep_back`).
        self.stop_margin = 0.0
        self.reason: str | None = None
        # The ranks of a distributed fit (`Runtime.agree`): each rank's stop flags and
        # epoch plan are agreed on, so that all stop at the same step and plan alike.
        self.agree: Callable[[list[float], str], list[float]] | None = None

    @property
    def keeps_checkpoints(self) -> bool:
        # Benchmarks and plain `fit` calls keep none: then no snapshot is built at all.
        return type(self.inner).on_checkpoint is not Callbacks.on_checkpoint

    def on_phase(self, phase: str) -> None:
        self.inner.on_phase(phase)

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.inner.on_step(epoch, step, steps_per_epoch)

    def on_epoch_end(self, metrics: dict[str, Any], best: dict[str, Any]) -> None:
        self.inner.on_epoch_end(metrics, best)

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        self.inner.on_checkpoint(state)

    def on_plan(self, epochs: float) -> None:
        self.inner.on_plan(epochs)

    def checkpoint_on_stop(self) -> bool:
        return self.inner.checkpoint_on_stop()

    def should_abandon(self) -> bool:
        """The caller's `should_abandon`, never the budget: what may cut the probe's feature
        extraction short. Not agreed between ranks: rank 0 extracts alone
        (Runtime.from_rank0), and the others wait for what it broadcasts."""
        if self.inner.should_abandon():
            self.reason = "callback"
        return self.reason == "callback"

    def should_stop(self) -> bool:
        asked = self.inner.should_stop()
        late = self.deadline is not None and time.monotonic() > self.deadline - self.stop_margin
        if self.agree is not None:
            asked, late = (v > 0 for v in self.agree([float(asked), float(late)], "max"))
        if asked:
            self.reason = "callback"
        elif late:
            self.reason = "time_budget"
        return self.reason is not None

    def epochs_within_budget(
        self,
        epoch: int,
        planned: float,
        per_epoch: float,
        fixed: float | None = None,
        ahead: float = 0.0,
    ) -> float:
        """How many epochs in all fit before the deadline, after `epoch` epochs that took
        `per_epoch` seconds each: at least `epoch` (this one was the last), at most
        `planned`. Whole epochs; with `fixed` (the seconds of an epoch that a shorter one
        still pays in full: its validation) the last may be a part of one, in twentieths,
        when at least `MIN_LAST_EPOCH` of one fits. `ahead`: seconds before epoch `epoch`
        ends (asked in the middle of it)."""
        if self.deadline is None:
            return planned
        left = max(0.0, self.deadline - self.reserve - time.monotonic() - ahead)
        more = float(left // per_epoch)
        if fixed is not None:
            part = (left - more * per_epoch - fixed) / max(per_epoch - fixed, 1e-9)
            if part >= MIN_LAST_EPOCH:
                more += math.floor(part * 20) / 20
        fits = min(planned, epoch + more)
        return fits if self.agree is None else self.agree([float(fits)], "min")[0]
