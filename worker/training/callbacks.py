"""How `fit` reports progress: callbacks, never globals or the database."""

from __future__ import annotations

from typing import Any


class Callbacks:
    """Override what you need; every hook is optional."""

    # Whether the caller exports what `fit` returns (a job: its model files and label
    # issues); a time budget keeps time for that delivery. False: a search's trial.
    delivers_model = True

    def on_phase(self, phase: str) -> None:
        """'preparing', 'training', 'evaluating', 'exporting'."""

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        """After each optimizer step (1-based `step` within 1-based `epoch`)."""

    def on_epoch_end(self, metrics: dict[str, Any], best: dict[str, Any]) -> None:
        """After validation, with this epoch's metrics and the best so far."""

    def on_plan(self, epochs: float) -> None:
        """When the time budget re-fits the fine-tuning schedule: the epochs it now plans
        in all (fewer on a machine slower than measured, more on a faster one), with the
        last one's share when it is a part of one (`5.35`: 5 whole epochs and 35% of a
        sixth)."""

    def on_run(self, epochs: float) -> None:
        """A new training run begins within the job (a search's trial or final run): its
        progress starts from nothing and counts `epochs`. By default, a plan of them."""
        self.on_plan(epochs)

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        """After each epoch (and after lp_ft's probe): everything needed to resume, as
        tensors, numbers, strings, lists and dicts (loadable with `weights_only=True`).
        Pass it back as `fit(..., resume=state)`."""

    def should_stop(self) -> bool:
        """Polled between steps; True ends training after the current step."""
        return False

    def should_abandon(self) -> bool:
        """Polled between the batches of a pass that has no steps to stop between (the
        probe's feature extraction): True abandons it. What ends a job at once (a cancel, a
        shutdown, a lost job, its time limit), never a time budget: the probe that pass feeds
        is the cheapest model a budget delivers. By default, `should_stop`."""
        return self.should_stop()

    def checkpoint_on_stop(self) -> bool:
        """Asked when `should_stop` ends training in the middle of an epoch: True writes a
        mid-epoch checkpoint first (a worker handing its job back on shutdown), so the
        resumed job goes on from that step instead of redoing the epoch."""
        return False
