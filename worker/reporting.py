"""Progress out of the training loop, into the job row and the object store: phase, steps,
ETA, per-epoch metrics, live curves and checkpoints. Also what the loop asks back: should it
stop (canceled, lost, time-limited, shutting down) and should it checkpoint when it does."""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from core import transitions
from core.db import session_scope
from core.settings import Settings
from core.storage import StorageError, get_store
from core.transitions import checkpoint_prefix
from worker import metrics as worker_metrics
from worker.celery_app import SHUTTING_DOWN
from worker.training.callbacks import Callbacks
from worker.training.plots import curves_png

log = logging.getLogger(__name__)


class DbReporter(Callbacks):
    """Writes progress and per-epoch metrics to the job row, throttled."""

    def __init__(
        self,
        job_id: str,
        worker_id: str,
        settings: Settings,
        total_epochs: int,
        deadline: float | None = None,
        attempt: int = 1,
    ):
        self.job_id = job_id
        # One key per attempt: a worker that lost the job (and has not noticed yet) can
        # never overwrite the checkpoint of the worker that took it over.
        self.checkpoint_key = f"{checkpoint_prefix(job_id)}attempt-{attempt}.pt"
        self.worker_id = worker_id
        self.settings = settings
        self.total_epochs = total_epochs
        self.planned_epochs = float(total_epochs)  # a re-fit's last epoch may be a part
        self.phase = "starting"
        self.lost = threading.Event()  # another worker or the reaper took the job
        self.cancel = threading.Event()  # the user asked to cancel
        self.deadline = deadline  # soft time limit (time.monotonic())
        self.time_limited = threading.Event()
        self.started = time.monotonic()
        self.last_write = 0.0
        self.epoch = 0
        self.done_steps = 0
        self.total_steps = 0
        self.history: list[dict[str, Any]] = []
        self.checkpoint_seconds: list[float] = []
        self.store = get_store(settings)

    def _write(self, **values: Any) -> None:
        with session_scope(self.settings) as s:
            if not transitions.record_progress(s, self.job_id, self.worker_id, **values):
                self.lost.set()
            elif transitions.cancel_requested(s, self.job_id):
                self.cancel.set()

    def on_phase(self, phase: str) -> None:
        self.phase = phase
        # The ETA counts from the training loop's start (a search run's phase is labelled).
        training = phase == "training" or phase.endswith(": training")
        self.started = time.monotonic() if training else self.started
        self._write(
            phase=phase,
            epoch=self.epoch,
            total_epochs=self.total_epochs,
            step=self.done_steps,
            total_steps=self.total_steps,
            eta_seconds=0.0 if phase == "exporting" else None,
        )

    def on_step(self, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.epoch = epoch
        self.done_steps = (epoch - 1) * steps_per_epoch + step
        # A shorter last epoch counts the steps it runs (at least those done: a plan that
        # shrank below them is at its end).
        planned = round(self.planned_epochs * steps_per_epoch)
        total = max(self.done_steps, planned)
        self.total_steps = total
        now = time.monotonic()
        if (
            now - self.last_write < self.settings.progress_interval_seconds
            and step != steps_per_epoch
            and self.done_steps != planned  # a shorter last epoch's last step is written too
        ):
            return
        self.last_write = now
        elapsed = now - self.started
        eta = elapsed / self.done_steps * (total - self.done_steps) if self.done_steps else None
        self._write(
            phase=self.phase,
            epoch=epoch,
            total_epochs=self.total_epochs,
            step=self.done_steps,
            total_steps=total,
            eta_seconds=eta,
        )

    def on_run(self, epochs: float) -> None:
        # A search's next run: nothing of the last one's progress carries over.
        self.epoch = self.done_steps = self.total_steps = 0
        self.started = time.monotonic()
        self.on_plan(epochs)

    def on_plan(self, epochs: float) -> None:
        # The budget re-fitted the schedule: progress and ETA count the epochs now planned,
        # a shorter last one by its steps.
        self.planned_epochs = epochs
        self.total_epochs = math.ceil(epochs - 1e-9)

    def on_epoch_end(self, metrics: dict[str, Any], best: dict[str, Any]) -> None:
        with session_scope(self.settings) as s:
            if not transitions.record_epoch(s, self.job_id, self.worker_id, metrics, best):
                self.lost.set()
        self.history.append(metrics)
        worker_metrics.epoch_ended(metrics)
        try:  # live curves; a plotting hiccup must never fail the job
            self.store.put_bytes(
                f"jobs/{self.job_id}/plots/curves.png", curves_png(self.history, self.job_id)
            )
        except Exception:  # noqa: BLE001
            log.warning("could not render curves for %s", self.job_id, exc_info=True)

    def on_checkpoint(self, state: dict[str, Any]) -> None:
        """Every epoch: to the object store first, then the row points at it. A store that is
        briefly unreachable is retried; one that stays down costs this checkpoint only (the
        job trains on; a crash would resume from an older one)."""
        start = time.monotonic()
        key = self.checkpoint_key
        with tempfile.NamedTemporaryFile(suffix=".pt") as f:
            torch.save(state, f.name)
            for attempt in range(1, 4):
                try:
                    self.store.put_file(key, Path(f.name))
                    break
                except StorageError:
                    log.warning("checkpoint write %d/3 for %s failed", attempt, self.job_id)
                    time.sleep(2.0 * attempt)
            else:
                log.error("job %s: checkpoint of epoch %s skipped", self.job_id, state["epoch"])
                return
        with session_scope(self.settings) as s:
            if not transitions.set_checkpoint(s, self.job_id, self.worker_id, key):
                self.lost.set()
        self.checkpoint_seconds.append(time.monotonic() - start)

    def checkpoint_on_stop(self) -> bool:
        """Mid-epoch checkpoint only when the job will be resumed: the worker is shutting
        down. Not on cancel (nothing resumes) nor when the job was lost (not ours)."""
        return SHUTTING_DOWN.is_set() and not self.lost.is_set() and not self.cancel.is_set()

    def should_stop(self) -> bool:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.time_limited.set()
        return (
            self.lost.is_set()
            or self.cancel.is_set()
            or self.time_limited.is_set()
            or SHUTTING_DOWN.is_set()
        )
