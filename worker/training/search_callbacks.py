"""One search run's view of the job's callbacks (`search.py`): phases labelled with the run,
progress passed through, epochs reported to Optuna for pruning and timed for the final run
(`search_final.EpochClock`), and the stop at the search's deadline."""

from __future__ import annotations

import time
from typing import Any

import optuna

from core.jobspec import JobSpec
from worker.training.callbacks import Callbacks
from worker.training.search_final import EpochClock

PHASE_CHARS = 40  # jobs.phase is a VARCHAR(40)


class TrialCallbacks(Callbacks):
    """One trial's view of the job's callbacks: phases are labelled with the trial, steps and
    plans go through (progress, and the reporter's cancel check), epochs are reported to
    Optuna for pruning but not to the job (its metrics become the best trial's, replayed at
    the end).
    Stops the trial when the job asks, when Optuna prunes it, or at the search's deadline.
    A trial's model is not exported (the search keeps time for the best one's)."""

    delivers_model = False

    def __init__(self, outer: Callbacks, trial: optuna.Trial | None, label: str, deadline: float):
        self.outer = outer
        self.trial = trial
        self.label = label
        self.deadline = deadline
        self.pruned = self.canceled = self.out_of_time = False
        self.first_epoch_at: float | None = None  # time.monotonic() of its first epoch's end
        # (epoch, time.monotonic(), share of its steps trained) at each epoch's end
        self.epoch_ends: list[tuple[int, float, float]] = []
        self.loop_start: float | None = None  # when its fine-tuning loop began
        self.share: float | None = None  # of the current epoch's steps, trained so far

    def clock(self, fit_start: float, spec: JobSpec) -> EpochClock | None:
        """The fit's measured times (`search_final.EpochClock`); None for a linear probe
        (its epochs are its head's, on cached features: it has converged)."""
        if spec.strategy == "linear_probe":
            return None
        return EpochClock.measure(fit_start, self.epoch_ends, self.loop_start)

    def on_phase(self, phase: str) -> None:
        if phase == "training" and self.loop_start is None:  # finetune's loop begins
            self.loop_start = time.monotonic()
        self.outer.on_phase(f"{self.label}: {phase}"[:PHASE_CHARS])

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.share = step / max(1, steps_per_epoch)
        self.outer.on_step(epoch, step, steps_per_epoch)

    def on_plan(self, epochs: float) -> None:
        """A budget re-fit of this run's epochs: the job's progress counts them (the search
        told it the run's planned epochs as the run began)."""
        self.outer.on_plan(epochs)

    def on_epoch_end(self, metrics: dict[str, Any], best: dict[str, Any]) -> None:
        if self.first_epoch_at is None:
            self.first_epoch_at = time.monotonic()
        share, self.share = (1.0 if self.share is None else self.share), None
        self.epoch_ends.append((int(metrics["epoch"]), time.monotonic(), share))
        value = metrics.get("val_accuracy")
        if value is None or self.trial is None:  # the final run is never pruned
            return
        self.trial.report(float(value), int(metrics["epoch"]))
        if self.trial.should_prune():
            self.pruned = True

    def should_abandon(self) -> bool:
        """The job's own stop only: the search's deadline never cuts a probe's feature pass."""
        if self.outer.should_abandon():
            self.canceled = True
        return self.canceled

    def should_stop(self) -> bool:
        if self.outer.should_stop():
            self.canceled = True
        if time.monotonic() > self.deadline:
            self.out_of_time = True
        return self.canceled or self.pruned or self.out_of_time
